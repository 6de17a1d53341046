"""The GPU check: every method on real-width models, in the three precisions GPU runs use, against PEFT.

    python -m runners.gpucheck                      # on a GPU machine: < 8 minutes on one H100-class GPU
    python -m runners.gpucheck --out gpucheck.json  # the same, plus the table as JSON
    python -m runners.gpucheck --device cpu --shapes small --steps 3   # what the CPU test runs

For each model (a CLIP ViT-B/32-shaped model and a ~1.1B Llama-shaped model, both randomly initialised:
the check is about arithmetic, memory and speed, not accuracy) and each precision mode

* `fp32`:       fp32 weights, no autocast;
* `bf16-amp`:   fp32 weights under bf16 autocast (how `trainer.bf16=true` trains on CUDA);
* `bf16-base`:  the frozen base stored in bf16, gradient checkpointing on (how large models are tuned),

every registered method is injected at the `lora8` budget (`methods.solve_budget`, one rank for every
layer, as PEFT's configs of RandLoRA and VeRA can express) and trained for a few
AdamW steps on random batches, once as ours and once as PEFT's same configuration, interleaved in one
process; in the `--compile-modes` (default on CUDA: bf16-amp, how `trainer.bf16` trains) also ours under
`torch.compile` (`trainer.compile`), whose first step's time beyond the median step is its compile time and
whose losses must match ours eager (fp32: 1e-3 relative, bf16: 3e-2); a model that cannot be compiled is a
failure line naming why. Checks, each a failure line when violated: the loss is finite at every step, every
adapter parameter has a non-zero gradient after the first backward (B = 0 at init makes A's first gradient
zero for LoRA-style methods, so the check runs after the second), and the update's rank stays within the
structure's bound where it has one (LoRA r, LoHa r^2; measured in fp32 on `delta_weight()`).
With two or more GPUs it also runs a tiny DDP job through `torchrun` and checks its results.json.

Exit status 1 when any check failed. Times are medians over the timed steps with `torch.cuda.synchronize`;
memory is the allocator's peak growth over the state before the first step (CUDA only).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import methods
from runners.engine.measure import matrix_ranks
from tasks.models import enable_memory_savers

log = logging.getLogger(__name__)

MODES = ("fp32", "bf16-amp", "bf16-base")

# Linear names in transformers' modeling files (5.x): CLIPAttention q/k/v/out_proj and CLIPMLP fc1/fc2
# (models/clip/modeling_clip.py); LlamaAttention q/k/v/o_proj and LlamaMLP gate/up/down_proj
# (models/llama/modeling_llama.py).
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Shape:
    """A model to check: how to build it, what adapters wrap, and one random batch's size."""

    name: str
    build: Callable[[], nn.Module]
    targets: list[str]
    batch: int
    tokens: int


def clip_b32(small: bool) -> nn.Module:
    """CLIP ViT-B/32's widths (huggingface.co/openai/clip-vit-base-patch32, config.json: vision 768 wide,
    12 layers, 12 heads, MLP 3072, patch 32, image 224; text 512 wide, 12 layers, 8 heads, MLP 2048,
    vocabulary 49408, 77 positions; projection 512), random weights."""
    from transformers import CLIPConfig, CLIPModel

    vision = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
              "num_attention_heads": 12, "patch_size": 32, "image_size": 224}
    text = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8,
            "vocab_size": 49408, "max_position_embeddings": 77}
    # The text tower pools at the end-of-text token, the last id of the vocabulary (49407 in the real
    # tokenizer); pooling elsewhere (e.g. token 0, which attends only to itself) zeroes q/k gradients.
    if small:
        vision.update(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      image_size=64)
        text.update(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    vocab_size=1000)
    text["eos_token_id"] = text["vocab_size"] - 1
    projection_dim = 512 if not small else 64
    return CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=projection_dim))


def llama_1b(small: bool) -> nn.Module:
    """A Llama of TinyLlama-1.1B's shape (huggingface.co/TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T,
    config.json: hidden 2048, MLP 5632, 22 layers, 32 heads, 4 key-value heads, vocabulary 32000), random."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
            "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000}
    if small:
        dims.update(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=1000)
    return LlamaForCausalLM(LlamaConfig(**dims))


def shapes(small: bool) -> list[Shape]:
    return [Shape("clip-vit-b32", lambda: clip_b32(small), CLIP_TARGETS, 8 if small else 64,
                  16 if small else 77),
            Shape("llama-1.1b", lambda: llama_1b(small), LLAMA_TARGETS, 2 if small else 4,
                  32 if small else 512)]


def make_batch(model: nn.Module, shape: Shape, device: torch.device, gen: torch.Generator) -> dict[str, Any]:
    """A random batch the model's own loss accepts: CLIP's contrastive loss, Llama's next-token loss."""
    cfg = model.config
    if shape.name.startswith("clip"):
        v, t = cfg.vision_config, cfg.text_config
        pixels = torch.randn(shape.batch, 3, v.image_size, v.image_size, generator=gen)
        tokens = min(shape.tokens, t.max_position_embeddings)
        ids = torch.randint(0, t.vocab_size - 1, (shape.batch, tokens), generator=gen)
        ids[:, -1] = t.vocab_size - 1  # the end token, where CLIP pools the text (see `clip_b32`)
        return {"pixel_values": pixels.to(device), "input_ids": ids.to(device), "return_loss": True}
    ids = torch.randint(0, cfg.vocab_size, (shape.batch, shape.tokens), generator=gen).to(device)
    return {"input_ids": ids, "labels": ids}


# ----------------------------------------------------------------------------- one configuration
@dataclass
class Row:
    """One (model, mode, method, implementation) result."""

    model: str
    mode: str
    method: str
    impl: str                   # "ours" | "peft" | "compiled" (ours under torch.compile)
    hp: dict[str, Any]
    trainable: int
    step_times_s: list[float] = field(default_factory=list)
    peak_growth_bytes: int | None = None
    peak_bytes: int | None = None            # torch.cuda.max_memory_allocated over the steps
    predicted_peak_bytes: int | None = None  # runners/engine/memplan.py's plan of the same configuration
    rank: dict[str, float] | None = None
    failures: list[str] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    first_step_s: float | None = None   # the first step, compile included for `compiled` rows

    @property
    def compile_time_s(self) -> float | None:
        """The first step's time beyond the median step (compiled rows only)."""
        if self.impl != "compiled" or self.first_step_s is None or self.step_time_s is None:
            return None
        return max(0.0, self.first_step_s - self.step_time_s)

    @property
    def step_time_s(self) -> float | None:
        return statistics.median(self.step_times_s) if self.step_times_s else None


def prepare_base(shape: Shape, mode: str, device: torch.device) -> nn.Module:
    """The frozen base model of a mode: fp32, or bf16 weights with gradient checkpointing."""
    torch.manual_seed(0)
    model = shape.build()
    model.requires_grad_(False)
    if mode == "bf16-base":
        model.to(torch.bfloat16)
        enable_memory_savers(model, {"gradient_checkpointing": True})  # the runner's own switch
    return model.to(device)


def wrap(base: nn.Module, shape: Shape, method: str, impl: str, hp: dict[str, Any]) -> nn.Module:
    """A copy of `base` with the method injected, ours or PEFT's (same solved hyper-parameters); seeded,
    so ours eager and compiled start from the same adapter weights."""
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    if impl in ("ours", "compiled"):
        methods.inject(model, method, shape.targets, **hp)
        if impl == "compiled":
            model.compile()   # nn.Module.compile: in place, parameter names unchanged
        return model
    import peft

    return peft.get_peft_model(model, methods.get_method(method).peft.config(hp, shape.targets))


def autocast(mode: str, device: torch.device):
    """bf16 autocast for `bf16-amp` (CPU autocast too, so the CPU test covers the same code)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16-amp")


def train_row(row: Row, model: nn.Module, shape: Shape, device: torch.device, steps: int,
              warmup: int) -> None:
    """Train a few steps, timing each; record failures of the finite-loss and gradient checks."""
    params = [p for p in model.parameters() if p.requires_grad]
    row.trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
    for step in range(warmup + steps):
        batch = make_batch(model, shape, device, gen)
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast(row.mode, device):
            loss = model(**batch).loss
        loss.backward()
        if step == 1:
            row.failures += gradient_failures(model, row.impl)
        opt.step()
        if cuda:
            torch.cuda.synchronize(device)
        if step >= warmup:
            row.step_times_s.append(time.perf_counter() - t0)
        elif step == 0:
            row.first_step_s = time.perf_counter() - t0
        row.losses.append(float(loss))
        if not math.isfinite(float(loss)):
            row.failures.append(f"loss is {float(loss)} at step {step + 1}")
            break
    if cuda:
        row.peak_bytes = torch.cuda.max_memory_allocated(device)
        row.peak_growth_bytes = row.peak_bytes - start_bytes


def predicted_peak(shape: Shape, mode: str, method: str, hp: dict[str, Any]) -> int:
    """The memory plan's peak (runners/engine/memplan.py) of this configuration, traced on the meta device.
    The check's optimizer is the unfused AdamW, whose step counters stay on the CPU (4 bytes each, noise)."""
    from runners.engine import memplan

    with torch.device("meta"):
        model = shape.build()
    model.requires_grad_(False)
    if mode == "bf16-base":
        model.to(torch.bfloat16)
    methods.inject(model, method, shape.targets, **hp)
    batch = make_batch(model, shape, torch.device("meta"), torch.Generator().manual_seed(0))
    return memplan.plan_model(model, batch, checkpointing=mode == "bf16-base", bf16=mode == "bf16-amp").peak


def gradient_failures(model: nn.Module, impl: str) -> list[str]:
    """Trainable parameters whose gradient is missing or all zero (checked on our adapters only; PEFT's
    names are PEFT's business)."""
    if impl != "ours":
        return []
    bad = [n for n, p in model.named_parameters()
           if p.requires_grad and (p.grad is None or not bool(p.grad.abs().sum() > 0))]
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return [f"zero or missing gradient: {', '.join(bad[:3])}{more}"] if bad else []


def rank_bound(layer: methods.AdapterLayer) -> int:
    """The structural bound of rank(dW) for this layer, as its method class declares it (`max_rank`)."""
    return type(layer).max_rank(layer.in_features, layer.out_features, **layer.hp)


def compile_failures(row: Row, eager: Row | None) -> list[str]:
    """A compiled row's losses against ours eager on the same batches from the same weights."""
    if row.impl != "compiled" or eager is None or not eager.losses:
        return []
    tol = 1e-3 if row.mode == "fp32" else 3e-2
    worst = max(abs(a - b) / max(abs(b), 1e-12)
                for a, b in zip(row.losses, eager.losses, strict=False))
    if worst <= tol:
        return []
    return [f"compiled losses differ from eager by {worst:.1e} relative (tolerance {tol:g})"]


def check_rank(row: Row, model: nn.Module) -> None:
    """rank(dW) of the first adapted layer, in fp32, against the structure's bound."""
    layer = next(iter(methods.adapter_layers(model).values()))
    row.rank = matrix_ranks(layer.delta_weight().detach().float())
    bound = rank_bound(layer)
    if row.rank["rank"] > bound:
        row.failures.append(f"rank(dW) = {row.rank['rank']} above the structure's bound {bound}")


# ----------------------------------------------------------------------------- the check
def run_shape(shape: Shape, modes: list[str], names: list[str], device: torch.device, steps: int, warmup: int,
              with_peft: bool, compile_modes: tuple[str, ...] = ()) -> list[Row]:
    """Every method in every mode on one model, ours and PEFT's interleaved per method."""
    rows = []
    for mode in modes:
        base = prepare_base(shape, mode, device)
        for method in names:
            # one setting for every layer: PEFT's RandLoRA and VeRA configs have no per-layer rank pattern
            hp = methods.solve_budget(base, method, shape.targets, "lora8", per_layer=False)
            hp = {**methods.get_method(method).resolve_hp({}), **hp}
            impls = ("ours", *(("peft",) if with_peft else ()),
                     *(("compiled",) if mode in compile_modes else ()))
            for impl in impls:
                row = Row(shape.name, mode, method, impl, hp, 0)
                try:
                    model = wrap(base, shape, method, impl, hp)
                    train_row(row, model, shape, device, steps, warmup)
                    if impl != "peft":
                        check_rank(row, model)
                        row.predicted_peak_bytes = predicted_peak(shape, mode, method, hp)
                    eager = next((r for r in rows if r.mode == mode and r.method == method
                                  and r.impl == "ours"), None)
                    row.failures += compile_failures(row, eager)
                except Exception as err:  # one failing configuration must not hide the others
                    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                    why = f"{type(err).__name__}: {first}"
                    row.failures.append(f"cannot be compiled ({why})" if impl == "compiled" else
                                        f"{type(err).__name__}: {err}")
                rows.append(row)
                log.info("%s", describe(row))
                model = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        del base
    return rows


def ddp_check(device_count: int) -> list[str]:
    """With >= 2 GPUs: a tiny DDP run and a tiny FSDP run through torchrun must each finish with one
    results.json, world size 2; their planned and measured peaks are logged."""
    if device_count < 2:
        return []
    return [f for strategy in ("ddp", "fsdp") for f in _two_gpu_run(strategy)]


def _two_gpu_run(strategy: str) -> list[str]:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "run.py",
               "method=lora", "task=clip", "dataset=shapes", "trainer.max_steps=20", "logger=none",
               "device=cuda", f"trainer.strategy={strategy}", f"out_dir={out}"]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
        record = Path(out, "results.json")
        if done.returncode != 0 or not record.is_file():
            return [f"{strategy} run failed (exit {done.returncode}): "
                    f"{done.stderr.strip().splitlines()[-1:]}"]
        saved = json.loads(record.read_text())
        cost = saved["cost"]
        log.info("%s over 2 GPUs: peak %s MiB, planned %s MiB", strategy, _mib(cost.get("peak_mem_bytes")),
                 _mib(cost.get("predicted_peak_bytes")))
        world = saved["run"].get("world_size")
        return [] if world == 2 else [f"{strategy} run recorded world_size {world}"]


def describe(row: Row) -> str:
    t = row.step_time_s
    time = f"{t * 1e3:.1f} ms" if t else "no time"
    failed = f" FAILED {row.failures}" if row.failures else ""
    return f"{row.model} {row.mode} {row.impl}:{row.method} {time}{failed}"


def table(rows: list[Row]) -> str:
    """Markdown: one line per (model, mode, method), ours next to PEFT's with the ratios."""
    peft = {(r.model, r.mode, r.method): r for r in rows if r.impl == "peft"}
    head = ("| model | mode | method | hp | trainable | ours ms | PEFT ms | ours/PEFT | ours MiB | "
            "PEFT MiB | peak MiB | planned MiB | rank(dW) | checks |")
    lines = [head, "|---" * head.count(" | ") + "|---|"]
    for r in (r for r in rows if r.impl != "peft"):
        p = peft.get((r.model, r.mode, r.method)) if r.impl == "ours" else None
        ratio = r.step_time_s / p.step_time_s if p and p.step_time_s and r.step_time_s else None
        lines.append("| " + " | ".join([
            r.model, r.mode, r.method + _compiled_note(r), f"r={r.hp.get('r')}", f"{r.trainable:,}",
            _ms(r.step_time_s),
            _ms(p.step_time_s if p else None), f"{ratio:.2f}" if ratio else "-", _mib(r.peak_growth_bytes),
            _mib(p.peak_growth_bytes if p else None), _mib(r.peak_bytes), _mib(r.predicted_peak_bytes),
            str(r.rank["rank"]) if r.rank else "-", _checks(r, p)]) + " |")
    return "\n".join(lines)


def _compiled_note(row: Row) -> str:
    if row.impl != "compiled":
        return ""
    if row.compile_time_s is None:
        return " (compiled)"
    return f" (compiled, {row.compile_time_s:.1f} s to compile)"


def _checks(ours: Row, peft: Row | None) -> str:
    failures = ours.failures + (peft.failures if peft else [])
    return "; ".join(failures) if failures else "ok"


def _ms(t: float | None) -> str:
    return f"{t * 1e3:.1f}" if t else "-"


def _mib(b: int | None) -> str:
    return f"{b / 2**20:.0f}" if b is not None else "-"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runners.gpucheck", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (the CPU test)")
    p.add_argument("--shapes", choices=("real", "small"), default="real",
                   help="real widths, or small for CPU tests")
    p.add_argument("--models", nargs="+", default=None, help="subset of: clip-vit-b32 llama-1.1b")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    p.add_argument("--steps", type=int, default=8, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps first (>= 2: the gradient check runs at step 2)")
    p.add_argument("--no-peft", action="store_true", help="skip PEFT's rows")
    p.add_argument("--compile-modes", nargs="*", choices=MODES, default=None,
                   help="modes that also train ours under torch.compile "
                        "(default: bf16-amp on CUDA, none on CPU)")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        log.error("no CUDA device here; run on a GPU machine, "
                  "or --device cpu --shapes small for the CPU check")
        return 2
    names = args.methods or methods.available()
    compile_modes = args.compile_modes if args.compile_modes is not None else (
        ["bf16-amp"] if device.type == "cuda" else [])
    chosen = [s for s in shapes(args.shapes == "small") if not args.models or s.name in args.models]
    rows: list[Row] = []
    for shape in chosen:
        rows += run_shape(shape, args.modes, names, device, args.steps, max(2, args.warmup), not args.no_peft,
                          tuple(compile_modes))
    failures = [f"{r.model} {r.mode} {r.impl}:{r.method}: {f}" for r in rows for f in r.failures]
    failures += ddp_check(torch.cuda.device_count() if device.type == "cuda" else 0)
    sys.stdout.write(table(rows) + "\n")  # the table is the output; progress goes to the log (stderr)
    if args.out:
        Path(args.out).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    for f in failures:
        log.error("FAILED %s", f)
    log.info("%d configurations, %d failures", len(rows), len(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
