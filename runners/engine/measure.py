"""Measurements, defined once and applied identically to every method.

* step time: wall time of a full optimizer step (all micro-batches), CUDA-synchronised on GPU;
* peak memory, training phase only, each quantity under its own name so they are never mixed:
  on CUDA the allocator's growth over the state at training start (`peak_mem_growth_bytes`: what
  training adds on top of the resident model), its absolute peak (`peak_mem_bytes`) and the caching
  allocator's reserved peak (`peak_reserved_bytes`, what `nvidia-smi` sees); on CPU the growth of the
  process's peak resident set size (`peak_rss_bytes`);
* on every device, two deterministic figures that need no allocator: `activation_bytes` (what autograd
  saves for backward in one forward, each storage once, the model's own weights excluded) and
  `state_bytes` (trainable parameters, their gradients and the optimizer's state);
* on every device, two deterministic figures of arithmetic and overhead (`StepCounts`):
  `flops_per_step` (torch's own FLOP counter, `torch.utils.flop_counter.FlopCounterMode`, over the forward,
  backward and optimizer update of one optimizer step) and `ops_per_step` (aten operators dispatched in that
  step, views included: on a GPU each non-view one is a kernel launch, so a method that is cheap in FLOPs
  but issues many small operators shows it here before any GPU is lent);
* delta rank: numerical and effective rank of the learned weight update of sampled layers.
"""
from __future__ import annotations

import contextlib
import re
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

import methods

_STATUS = Path("/proc/self/status")


class StepTimer:
    """Collects per-step wall times; statistics skip the first `warmup` steps (allocation, caches)."""

    def __init__(self, device: torch.device, warmup: int) -> None:
        self.device, self.warmup = device, warmup
        self.times: list[float] = []
        self._t0 = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def stop(self, timed: bool = True) -> float:
        """The step's wall time; `timed=False` keeps it out of the statistics (a step the runner slowed
        down to count it, or one that compiled the model)."""
        self._sync()
        dt = time.perf_counter() - self._t0
        if timed:
            self.times.append(dt)
        return dt

    def summary(self, samples_per_step: int) -> dict[str, float | None]:
        median, p90 = median_and_p90(self.times, self.warmup)
        return {"step_time_s": median, "step_time_p90_s": p90,
                "samples_per_s": samples_per_step / median if median else None}


def median_and_p90(values: list[float], warmup: int) -> tuple[float | None, float | None]:
    """Median and 90th percentile of per-step figures after the first `warmup` (all of them when there
    are no more); (None, None) for none. One rule for step times and data waits."""
    timed = sorted(values[warmup:] or values)
    if not timed:
        return None, None
    return statistics.median(timed), timed[min(len(timed) - 1, round(0.9 * (len(timed) - 1)))]


def _vm_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class PeakMemory:
    """Training-only peak memory: CUDA allocator figures, or peak-RSS growth of this process on CPU.

    The CPU path never calls into CUDA (a CPU run must not initialise a GPU it does not use).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._base = 0

    @property
    def keys(self) -> tuple[str, ...]:
        """The `cost` entries `figures()` fills on this device."""
        if self.device.type == "cuda":
            return ("peak_mem_growth_bytes", "peak_mem_bytes", "peak_reserved_bytes")
        return ("peak_rss_bytes",)

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = int(torch.cuda.memory_allocated(self.device))
            return
        _reset_rss_peak()
        self._base = (_vm_kib("VmRSS") or 0) * 1024

    def figures(self) -> dict[str, int | None]:
        """Bytes by key (see `keys`); None where the platform cannot tell."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = int(torch.cuda.max_memory_allocated(self.device))
            return {"peak_mem_growth_bytes": max(0, peak - self._base), "peak_mem_bytes": peak,
                    "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(self.device))}
        hwm = _vm_kib("VmHWM")
        return {"peak_rss_bytes": None if hwm is None else max(0, hwm * 1024 - self._base)}

    def peak(self) -> int | None:
        """One number: the allocator's absolute peak on CUDA, the RSS growth on CPU (runners.bench)."""
        figures = self.figures()
        return figures["peak_mem_bytes" if self.device.type == "cuda" else "peak_rss_bytes"]


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: an FSDP shard (DTensor) as its local tensor, others as they are."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), local(t).untyped_storage().data_ptr()


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views and repeats counted once; FSDP: this
    process's shards)."""
    seen: dict[tuple[str, int], int] = {}
    for t in map(local, tensors):
        seen.setdefault(_storage_key(t), t.untyped_storage().nbytes())
    return sum(seen.values())


class SavedActivations:
    """Bytes autograd saves for backward while the context is open: `activation_bytes`.

    Each storage is counted once, at its full size (a saved view holds its whole storage), so a tensor
    saved by two ops (a ReLU output that is also the next Linear's input) counts once. Storages of the
    model's parameters and buffers are excluded: frozen weights (and RandLoRA's bases) that an op saves
    for backward are resident anyway, and counting them would bury the method's own cost under the model
    size -- the flaw of an absolute allocator peak. Casts and other copies of weights made in the forward
    are new storages and count, and so does the batch where an op saves it (the first Linear's input).

    Not seen: tensors a custom autograd function keeps as plain `ctx` attributes instead of through
    `save_for_backward`, and whatever is saved inside a region that installs its own saved-tensor hooks
    (non-reentrant activation checkpointing, CPU offloading: the innermost hooks win there).
    """

    def __init__(self, model: nn.Module) -> None:
        state = [*model.parameters(), *model.buffers()]
        self._resident = {_storage_key(t) for t in state if t.device.type != "meta"}
        self._saved: dict[tuple[str, int], int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            key = _storage_key(t)
            if key not in self._resident:
                self._saved.setdefault(key, t.untyped_storage().nbytes())
        return t

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield

    @property
    def bytes(self) -> int:
        return sum(self._saved.values())


class _OpCounter(TorchDispatchMode):
    """Counts every aten operator dispatched while active (below autograd: the forward's and the
    backward's operators, a custom autograd function's included), by name."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.by_op[name] = self.by_op.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _formula_of(op: Any) -> Callable[..., int]:
    """The FLOP formula torch registers for `op`, in the raw form FlopCounterMode's custom_mapping takes."""
    registered = flop_counter.flop_registry[op]

    def formula(*args: Any, **kwargs: Any) -> int:
        return registered(*args, **kwargs)

    formula._get_raw = True  # already shape-wrapped by torch's registration
    return formula


_aten = torch.ops.aten
#: Operators torch's FLOP registry (torch 2.13, torch/utils/flop_counter.py) has no formula for, counted
#: like their registered twins: the in-place products the adapters' fast paths accumulate with
#: (`addmm_`, `baddbmm_`), and the CPU kernels of scaled-dot-product attention (the registry names the
#: CUDA ones only), so that a CPU count equals a GPU count of the same step.
EXTRA_FLOP_FORMULAS = {
    _aten.addmm_: _formula_of(_aten.addmm), _aten.baddbmm_: _formula_of(_aten.baddbmm),
    _aten._scaled_dot_product_flash_attention_for_cpu: _formula_of(_aten._scaled_dot_product_flash_attention),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward:
        _formula_of(_aten._scaled_dot_product_flash_attention_backward),
}


class StepCounts:
    """FLOPs and dispatched operators of what runs inside `counting()`: `flops_per_step`, `ops_per_step`.

    Deterministic on every device (shapes decide them, not the clock). The counting modes run Python per
    operator, so the step they watch is slower: the runner counts a step whose time it does not use.
    FlopCounterMode counts matrix products, convolutions and attention (2 per multiply-add, torch's
    convention; `EXTRA_FLOP_FORMULAS` adds what its registry lacks);
    element-wise work has no FLOPs there and shows in the operator count instead."""

    def __init__(self) -> None:
        self.flops: int | None = None
        self.ops: int | None = None
        self.by_op: dict[str, int] = {}

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        flops = flop_counter.FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)
        ops = _OpCounter()
        with flops, ops:
            yield
        self.flops, self.ops = int(flops.get_total_flops()), sum(ops.by_op.values())
        self.by_op = dict(sorted(ops.by_op.items(), key=lambda kv: -kv[1]))

    def figures(self) -> dict[str, int | None]:
        """The `cost` entries: None until a step was counted."""
        return {"flops_per_step": self.flops, "ops_per_step": self.ops}


def state_bytes(params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> int | None:
    """Trainable parameters + one gradient per parameter (same shape and dtype) + every tensor of the
    optimizer's state (AdamW: two moments per element and a step counter per tensor), of this process
    (FSDP: its shards). None before the optimizer has state (nothing trained yet)."""
    moments = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    if not moments:
        return None
    weights = sum(local(p).numel() * p.element_size() for p in params)
    return 2 * weights + storage_bytes(moments)


def _reset_rss_peak() -> None:
    """Linux resets VmHWM to the current RSS on `5` written to clear_refs; elsewhere the peak is lifetime.

    Freed heap memory that glibc keeps resident would otherwise serve the training phase's allocations
    without raising the RSS, so it is returned to the system first (malloc_trim, glibc only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


@torch.no_grad()
def matrix_ranks(delta: torch.Tensor) -> dict[str, float]:
    """Numerical rank (torch's default tolerance) and effective rank (exp of singular-value entropy)."""
    delta = delta.detach().float().cpu()
    s = torch.linalg.svdvals(delta)
    max_rank = min(delta.shape)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return {"rank": 0, "effective_rank": 0.0, "max_rank": max_rank}
    tol = float(s[0]) * max(delta.shape) * torch.finfo(torch.float32).eps
    p = s / s.sum()
    p = p[p > 0]
    effective = float(torch.exp(-(p * p.log()).sum()))
    return {"rank": int((s > tol).sum()), "effective_rank": effective, "max_rank": max_rank}


RANK_SAMPLE = 4  # adapted layers whose update rank is reported



def _sample_names(names: list[str]) -> list[str]:
    if len(names) <= RANK_SAMPLE:
        return list(names)
    idx = [round(i * (len(names) - 1) / (RANK_SAMPLE - 1)) for i in range(RANK_SAMPLE)]
    return [names[i] for i in idx]


@torch.no_grad()
def sample_weights(model: nn.Module, rank_layers: list[str]) -> dict[str, torch.Tensor | None]:
    """A few of `rank_layers` (adapted or, for full, targeted) whose rank(dW) is reported at the end, with
    an fp32 copy of each plain layer's weight (None for an adapter: its dW is its own)."""
    layers = {n: model.get_submodule(n) for n in _sample_names(rank_layers)}
    return {n: None if _is_adapter(m) else m.weight.detach().float().cpu().clone() for n, m in layers.items()}


@torch.no_grad()
def delta_ranks(model: nn.Module, before: dict[str, torch.Tensor | None]) -> dict[str, dict[str, float]]:
    """rank(dW) of each layer `sample_weights` chose, after training."""
    return {n: matrix_ranks(_update(model.get_submodule(n), w)) for n, w in before.items()}


def _update(module: nn.Module, before: torch.Tensor | None) -> torch.Tensor:
    """dW in fp32: an adapter's own `delta_weight()`, never (W + dW) - W, which in a bf16 base rounds a
    rank-4 update into a full-rank one (rank ~128 of 128 on the tiny CLIP); for a plain Linear (full
    fine-tuning) the change of its weight, subtracted in fp32."""
    if _is_adapter(module):
        return module.delta_weight().detach().float().cpu()
    return module.weight.detach().float().cpu() - before


def _is_adapter(module: nn.Module) -> bool:
    return isinstance(module, methods.AdapterLayer) and not module.merged
