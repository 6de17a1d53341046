"""The memory plan: a job's peak accelerator memory, predicted on the meta device before it is queued.

    predicted peak = frozen weights (in their dtype, buffers included)
                   + state bytes (trainable weights, their gradients, AdamW's two moments and step counter)
                   + activations (what autograd saves in one micro-batch's forward)
    fits when        predicted peak + allowance <= the card's memory

Everything is derived from the architecture built on the `meta` device (no weights, no download when a
published config is known, see `PUBLISHED`), adapted by the run's own `runners.engine.adapt.adapt` (so the
budget solver gives the same hyper-parameters as the run):

* state bytes are exact: the counts and dtypes of the trainable tensors, as
  `runners.engine.measure.state_bytes` measures them (a fused AdamW keeps a float32 step scalar per tensor);
* activations are traced, not guessed: one forward of a batch of the configured micro-batch and sequence
  length runs on the meta device under a saved-tensor hook that counts each storage once, as
  `runners.engine.measure.SavedActivations` does on a real device (the model's own parameters excluded). The
  trace is split per transformer block, so gradient checkpointing is derived from it: the blocks' inputs
  are kept, and one block's saved tensors exist again while its backward recomputes it.
  Under bf16 autocast (GPU runs with `trainer.bf16`) the trace runs on a bf16 copy of the model and adds
  the bf16 copies autocast makes of float32 weight matrices; ops autocast keeps in float32 (softmax, norms,
  the loss) are then counted at 2 bytes where they hold 4 -- an underestimate, bounded by the allowance.
  The meta device's attention is the math path (the S x S weights are saved); CUDA's flash attention
  saves O(S) per head instead -- an overestimate for long sequences.
* the allowance (`plan.allowance_gb`) covers what the allocator does not see or cannot predict: the CUDA
  context, cuBLAS workspaces, NCCL buffers, fragmentation of the caching allocator. It is the project's
  chosen margin, not a measured constant.

`cost.predicted_peak_bytes` (every run) is the peak without the allowance, the figure comparable with
`torch.cuda.max_memory_allocated`; on the CPU `predicted_activation_bytes + predicted_state_bytes` are
comparable with the measured `activation_bytes + state_bytes`.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from runners.engine.distributed import transformer_blocks

log = logging.getLogger(__name__)

GiB = 2**30

# Architectures of the large models, from each model's config.json on the Hugging Face hub, used when the
# hub (or a local copy) cannot be read: the plan needs shapes only.
PUBLISHED: dict[str, dict[str, Any]] = {
    # huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json (LlamaForCausalLM; the repo is gated,
    # its config is also in github.com/meta-llama/llama3 params.json: dim 4096, 32 layers, 32 heads, 8 kv
    # heads, vocabulary 128256, ffn 14336 from multiple_of 1024 and ffn_dim_multiplier 1.3)
    "meta-llama/Meta-Llama-3-8B": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "tie_word_embeddings": False},
    # huggingface.co/openai/clip-vit-large-patch14/blob/main/config.json: projection 768; vision 1024 wide,
    # 24 layers, 16 heads, MLP 4096, patch 14, image 224; text 768 wide, 12 layers, 12 heads, MLP 3072,
    # vocabulary 49408, 77 positions
    "openai/clip-vit-large-patch14": {
        "model_type": "clip", "projection_dim": 768,
        "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                          "num_attention_heads": 16, "patch_size": 14, "image_size": 224},
        "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                        "num_attention_heads": 12, "vocab_size": 49408, "max_position_embeddings": 77}},
}


@dataclass(frozen=True)
class Plan:
    """One job's predicted memory, per GPU, in bytes."""

    weights: int           # frozen parameters and buffers, in their dtype
    state: int             # trainable weights + gradients + AdamW state (exact)
    activations: int       # saved for backward in one micro-batch (traced)
    block_weights: int     # the largest transformer block's parameters (FSDP gathers one or two at a time)
    micro_batch: int
    checkpointing: bool

    @property
    def peak(self) -> int:
        """What the allocator should peak at (torch.cuda.max_memory_allocated)."""
        return self.weights + self.state + self.activations

    def needs(self, allowance: int) -> int:
        return self.peak + allowance

    def fsdp_peak(self, gpus: int) -> int:
        """Per-GPU peak under FSDP over `gpus` cards: weights and state sharded, the per-process micro-batch
        `micro_batch / gpus` (the global batch is split), two blocks' full weights gathered at a time."""
        return math.ceil((self.weights + self.state) / gpus) + math.ceil(self.activations / gpus) \
            + 2 * self.block_weights

    def fsdp_gpus(self, card: int, allowance: int, most: int = 64) -> int | None:
        """The fewest GPUs FSDP needs for this job on `card`-byte cards; None beyond `most`."""
        return next((n for n in range(2, most + 1) if self.fsdp_peak(n) + allowance <= card), None)


def gb(n: float) -> str:
    """Bytes for people: GiB from 1 GiB up, MiB below."""
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


# --- building the job on the meta device ----------------------------------------------------------

@functools.cache
def model_config(path: str) -> Any:
    """The model's transformers config: a local folder's or the cache's, else `PUBLISHED` (no network: the
    hub's retries cost ~20 s offline), else the hub's."""
    from transformers import AutoConfig, CLIPConfig

    from tasks.models import resolve_model_path

    try:
        return AutoConfig.from_pretrained(resolve_model_path(path), local_files_only=path in PUBLISHED)
    except Exception as err:
        if path not in PUBLISHED:
            raise LookupError(f"model {path}: config unreadable ({type(err).__name__}) and no published "
                              f"architecture is known here (known: {', '.join(PUBLISHED)})") from err
    spec = dict(PUBLISHED[path])
    log.info("memory plan: %s's config unreadable here; its published architecture is used", path)
    if spec.pop("model_type") == "clip":
        return CLIPConfig(**spec)
    from transformers import LlamaConfig

    return LlamaConfig(**spec)


def skeleton(task_cfg: DictConfig, device: str = "meta") -> nn.Module:
    """The task's backbone on the meta device (no memory), its frozen weights in `task.model.dtype`;
    gradient checkpointing stays off (`trace_activations` derives it per block)."""
    from tasks.models import base_dtype

    model = model_from_config(model_config(str(task_cfg.model.path)), task_cfg, device)
    dtype = base_dtype(task_cfg.model)
    return model.to(dtype) if dtype is not None else model


def model_from_config(config: Any, task_cfg: DictConfig, device: str = "meta") -> nn.Module:
    """The model class the task loads, built from a transformers config on `device` (no weights read)."""
    from transformers import AutoModel, AutoModelForCausalLM, CLIPModel, CLIPVisionModel

    with torch.device(device):
        if task_cfg.kind == "clip":
            return CLIPModel(config)
        if task_cfg.kind == "commonsense":
            return AutoModelForCausalLM.from_config(config)
        if config.model_type == "clip":  # task=vision with a CLIP image tower
            return CLIPVisionModel(config.vision_config)
        return AutoModel.from_config(config, **dict(task_cfg.model.kwargs))


def example_batch(model: nn.Module, task_cfg: DictConfig, micro_batch: int) -> dict[str, Any]:
    """Inputs of the configured shapes on the meta device: CLIP images with one 77-token prompt each (CLIP's
    context length: an upper bound on the task's prompts), a causal LM's `task.data.max_length` tokens
    (training truncates there), images at the vision config's size, or token sequences."""
    cfg = model.config
    vision = getattr(cfg, "vision_config", cfg)

    def images() -> torch.Tensor:
        return torch.empty(micro_batch, 3, vision.image_size, vision.image_size, device="meta")

    def tokens(n: int) -> torch.Tensor:
        return torch.zeros(micro_batch, n, dtype=torch.long, device="meta")

    if task_cfg.kind == "clip":
        return {"pixel_values": images(), "input_ids": tokens(cfg.text_config.max_position_embeddings),
                "return_loss": True}
    if task_cfg.kind == "commonsense":
        ids = tokens(int(task_cfg.data.max_length))
        return {"input_ids": ids, "labels": ids}
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        return {"pixel_values": images()}
    return {"input_ids": tokens(int(task_cfg.data.max_length))}


# --- the trace -----------------------------------------------------------------------------------

def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata  # the StorageImpl: shared by views, distinct per tensor (meta too)


class BlockTrace:
    """Bytes saved for backward on the meta device, per transformer block (None: outside every block),
    and the bytes of each block's input (what gradient checkpointing keeps)."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module]) -> None:
        self._resident = {_storage(t) for t in [*model.parameters(), *model.buffers()]}
        self._where: int | None = None
        self.saved: dict[int | None, dict[int, int]] = {}
        self.inputs: list[int] = []
        self._blocks = blocks

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage(t)
        if key not in self._resident:
            self.saved.setdefault(self._where, {}).setdefault(key, t.untyped_storage().nbytes())
        return t

    def _enter(self, index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            self._where = index
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            self.inputs.append(0 if first is None else first.nbytes)
        return hook

    def _leave(self, module: nn.Module, args: tuple, out: Any) -> None:
        self._where = None

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        handles = [h for i, b in enumerate(self._blocks)
                   for h in (b.register_forward_pre_hook(self._enter(i)),
                             b.register_forward_hook(self._leave))]
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield
        finally:
            for h in handles:
                h.remove()

    def activation_bytes(self, checkpointing: bool) -> int:
        """All saved bytes; with checkpointing, those outside the blocks + every block's input + the largest
        block's saved bytes (its recomputation in backward)."""
        if not self.saved:  # nothing trained (head-only with no head): no graph, nothing kept
            return 0
        per_block = [sum(v.values()) for k, v in self.saved.items() if k is not None]
        outside = sum(self.saved.get(None, {}).values())
        if not checkpointing:
            return outside + sum(per_block)
        return outside + sum(self.inputs) + max(per_block, default=0)


def trace_activations(model: nn.Module, batch: dict[str, Any], checkpointing: bool, bf16: bool) -> int:
    """Activation bytes of one forward of `batch` through the meta `model` (see the module docstring)."""
    traced = copy.deepcopy(model)  # meta: no memory; the dtype change below must not reach the planned model
    blocks = transformer_blocks(traced)
    casts = _autocast_copies(traced, blocks, checkpointing) if bf16 else 0
    if bf16:
        traced.to(torch.bfloat16)
        batch = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
                 for k, v in batch.items()}
    traced.train()
    trace = BlockTrace(traced, blocks)
    with trace.recording():
        out = traced(**batch)
        _ = out.loss if getattr(out, "loss", None) is not None else out[0].float().mean()
    saved = trace.activation_bytes(checkpointing)
    return saved + casts if saved else 0  # nothing trained: no graph keeps the casts either


def _autocast_copies(model: nn.Module, blocks: list[nn.Module], checkpointing: bool) -> int:
    """Bytes of the bf16 copies autocast makes of float32 weight matrices (embeddings are looked up, not
    cast), saved for backward; with checkpointing, those of one block at a time."""
    def copies(module: nn.Module) -> int:
        embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
        return 2 * sum(p.numel() for p in module.parameters()
                       if p.dtype == torch.float32 and p.dim() >= 2 and id(p) not in embeddings)

    total = copies(model)
    if not checkpointing:
        return total
    per_block = [copies(b) for b in blocks]
    return total - sum(per_block) + max(per_block, default=0)


def state_bytes(model: nn.Module) -> int:
    """Trainable weights + gradients + AdamW's two moments (each the parameter's dtype) + a float32 step
    scalar per tensor: what `runners.engine.measure.state_bytes` measures after a step of the fused AdamW."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return sum(4 * p.numel() * p.element_size() + 4 for p in trainable)


def frozen_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
               if not t.requires_grad)


def plan_job(cfg: DictConfig, processes: int = 1, gpu: bool = True) -> Plan:
    """The memory plan of the run `cfg` describes, per process of `processes` (data-parallel: each
    trains on trainer.batch_size / processes). `gpu`: as a GPU runs it (bf16 autocast if trainer.bf16)."""
    import tasks
    from runners.engine.adapt import adapt

    model = skeleton(cfg.task)
    task = tasks.build(cfg.task)
    adapt(model, cfg.method, task.target_modules, [], cfg.budget, cfg.budget_alpha)
    checkpointing = bool(cfg.task.model.gradient_checkpointing)
    micro = max(1, int(cfg.trainer.batch_size) // processes)
    batch = example_batch(model, cfg.task, micro)
    return plan_model(model, batch, checkpointing, bf16=gpu and bool(cfg.trainer.bf16))


def plan_model(model: nn.Module, batch: dict[str, Any], checkpointing: bool, bf16: bool) -> Plan:
    """The plan of an adapted meta `model` trained on `batch` (its first dimension: the micro-batch)."""
    activations = trace_activations(model, batch, checkpointing, bf16)
    block = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in transformer_blocks(model))
    micro = next(v.shape[0] for v in batch.values() if torch.is_tensor(v))
    return Plan(frozen_bytes(model), state_bytes(model), activations, block, micro, checkpointing)


def advice(plan: Plan, card: int, allowance: int) -> str:
    """What would make a job fit `card`: gradient checkpointing, a smaller micro-batch with more
    accumulation, FSDP over N GPUs (the first of them that helps, in that order of cost)."""
    room = card - allowance - plan.weights - plan.state
    options = []
    if room > 0 and not plan.checkpointing:
        options.append("task.model.gradient_checkpointing=true")
    if room > 0 and plan.micro_batch > 1:
        per_sample = plan.activations / plan.micro_batch
        fits = int(room // per_sample) if per_sample else plan.micro_batch
        if 1 <= fits < plan.micro_batch:
            options.append(f"trainer.batch_size<={fits} with trainer.grad_accum raised to keep the "
                           "effective batch")
    gpus = plan.fsdp_gpus(card, allowance)
    options.append(f"FSDP over {gpus} GPUs (trainer.strategy=fsdp, hydra.launcher.gpus_per_node={gpus})"
                   if gpus else "more than 64 GPUs under FSDP")
    return "; or ".join(options)


def verdict(job: str, plan: Plan, card: int, allowance: int) -> str | None:
    """One line for a job that cannot fit, None when it fits."""
    if plan.needs(allowance) <= card:
        return None
    return (f"{job}: predicted peak {gb(plan.peak)} + {gb(allowance)} allowance > {gb(card)} per GPU "
            f"(weights {gb(plan.weights)}, state {gb(plan.state)}, activations {gb(plan.activations)} at "
            f"micro-batch {plan.micro_batch}); would fit with {advice(plan, card, allowance)}")


def card_bytes(plan_cfg: DictConfig) -> int | None:
    """The card's memory: `plan.gpu_memory_gb` (GiB), else this node's first GPU, else None (unknown)."""
    if plan_cfg.gpu_memory_gb is not None:
        return int(float(plan_cfg.gpu_memory_gb) * GiB)
    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory)
    return None


# --- jobs: sweeps and the plan command -------------------------------------------------------------

def job_plan(cfg: DictConfig, processes: int, gpu: bool = True) -> tuple[Plan, int]:
    """(plan, per-GPU peak) of a job run by `processes` GPUs under its `trainer.strategy`: data-parallel
    replicas each hold the whole model and train on batch / processes; FSDP shards weights and state."""
    if processes > 1 and str(cfg.trainer.strategy) == "fsdp":
        plan = plan_job(cfg, 1, gpu)
        return plan, plan.fsdp_peak(processes)
    plan = plan_job(cfg, processes, gpu)
    return plan, plan.peak


PREDICTED = ("predicted_peak_bytes", "predicted_activation_bytes", "predicted_state_bytes")


def predicted_cost(cfg: DictConfig, processes: int, gpu: bool) -> dict[str, int | None]:
    """The run's `cost.predicted_*` figures, per process, beside what it measures; None each (and a warning)
    when its architecture cannot be planned, which never fails the run."""
    try:
        plan, peak = job_plan(cfg, processes, gpu)
    except Exception as err:  # a prediction is a report, not a requirement
        log.warning("memory plan unavailable for this run (%s: %s)", type(err).__name__, err)
        return dict.fromkeys(PREDICTED)
    shards = processes if processes > 1 and str(cfg.trainer.strategy) == "fsdp" else 1
    return {"predicted_peak_bytes": peak, "predicted_activation_bytes": math.ceil(plan.activations / shards),
            "predicted_state_bytes": math.ceil(plan.state / shards)}


def over_card(jobs: list[tuple[str, DictConfig]], plan_cfg: DictConfig, processes: int, show: bool = False
              ) -> list[str]:
    """One line per job whose predicted per-GPU peak + allowance exceeds the card; [] when every job fits
    or the card's memory is unknown (no `plan.gpu_memory_gb`, no GPU here: nothing checked, each job's plan
    logged all the same when `show`, as a dry run does)."""
    card = card_bytes(plan_cfg)
    if card is None and not show:
        log.info("memory plan not checked: set plan.gpu_memory_gb=<GiB per GPU> (no GPU on this machine)")
        return []
    allowance = int(float(plan_cfg.allowance_gb) * GiB)
    lines, seen = [], {}
    for name, cfg in jobs:
        key = _plan_key(cfg)
        if key not in seen:
            seen[key] = _plan_or_none(name, cfg, processes)
        if seen[key] is None:
            continue
        plan, peak = seen[key]
        log.info("memory plan %s: %s per GPU (+ %s allowance) of %s", name, gb(peak), gb(allowance),
                 "an unknown card (set plan.gpu_memory_gb)" if card is None else gb(card))
        if card is not None and peak + allowance > card:
            lines.append(verdict(name, plan, card, allowance) if processes == 1 else
                         f"{name}: predicted peak {gb(peak)} + {gb(allowance)} allowance > {gb(card)} "
                         f"per GPU over {processes} GPUs; would fit with {advice(plan, card, allowance)}")
    return lines


def _plan_or_none(name: str, cfg: DictConfig, processes: int) -> tuple[Plan, int] | None:
    """A job's (plan, peak), or None with one warning when its model's architecture cannot be read here (no
    cached config.json and none of the published ones known) or its forward cannot run on the meta device:
    the plan cannot run, the job is not refused."""
    try:
        return job_plan(cfg, processes)
    except LookupError as err:
        reason = str(err)
    except NotImplementedError as err:  # e.g. PEFT's WaveFT indexes by a mask: nonzero() has no meta kernel
        reason = f"its forward cannot be traced on the meta device ({str(err).split('.')[0]})"
    log.warning("memory plan not checked for %s (and jobs of the same setting): %s", name, reason)
    return None


#: trainer and method keys that set only numbers of the optimizer's schedule, never a tensor's size: jobs
#: that differ only in these (a tuned sweep's lr candidates) share one plan
SCHEDULE_KEYS = ("lr", "method_lr", "weight_decay", "warmup_steps", "warmup_ratio", "schedule",
                 "final_lr_ratio", "grad_clip")


def _plan_key(cfg: DictConfig) -> str:
    """What a job's plan depends on: its config less the seed, the lr schedule and where or how it is run
    and logged."""
    keep = {k: OmegaConf.to_container(v, resolve=True) if isinstance(v := cfg.get(k), DictConfig) else v
            for k in ("task", "method", "budget", "budget_alpha", "trainer", "size")}
    for node in (keep["trainer"], keep["method"]):
        for name in SCHEDULE_KEYS:
            node.pop(name, None)
    return json.dumps(keep, sort_keys=True, default=str)


def summary(cfg: DictConfig) -> tuple[str, list[str]]:
    """One run's plan in one line, and [its verdict] when it cannot fit the card (the preflight's)."""
    processes = 1
    plan, peak = job_plan(cfg, processes)
    allowance = int(float(cfg.plan.allowance_gb) * GiB)
    card = card_bytes(cfg.plan)
    line = (f"memory plan ({cfg.method.name}, budget {cfg.budget}, micro-batch {plan.micro_batch}): weights "
            f"{gb(plan.weights)} + state {gb(plan.state)} + activations {gb(plan.activations)} = {gb(peak)} "
            f"per GPU, + {gb(allowance)} allowance; "
            + ("card unknown (set plan.gpu_memory_gb)" if card is None else
               f"card {gb(card)}: " + ("fits" if peak + allowance <= card else "DOES NOT FIT")))
    over = (None if card is None else
            verdict(f"{cfg.method.name} at budget {cfg.budget}", plan, card, allowance))
    return line, [over] if over else []
