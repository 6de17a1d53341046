"""`run(cfg)`: one rankbench run, top to bottom.

seed -> task -> adapt (inject / full / none) -> assert count == closed form -> evaluate before ->
AdamW + warm-up/cosine loop (measured) -> evaluate after -> save adapter -> results.json -> logger.
Method-specific behaviour lives in `methods/` and `runners.adapt`, never in this loop.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

import methods
import tasks
from runners import distributed, env
from runners.adapt import Adaptation, adapt, is_head, method_info, method_names
from runners.checkpoint import (
    PreemptionGuard,
    load_before,
    load_checkpoint,
    remove_checkpoints,
    save_before,
    save_checkpoint,
)
from runners.cli import check_values
from runners.compiled import StepRunner
from runners.data import batch_split_problem, make_loader, wait_summary
from runners.export import import_peft_adapter, save_head
from runners.logger import log_suite, make_logger
from runners.memplan import predicted_cost
from runners.metrics import PeakMemory, SavedActivations, StepCounts, StepTimer, matrix_ranks, state_bytes
from runners.results import SCHEMA, is_complete, read_results, write_results
from runners.schema import Params, Record, Run
from runners.suite import run_suite, suite_datasets
from tasks.forgetting import forgetting_metrics
from tasks.models import hub_revision, resolve_model_path

log = logging.getLogger(__name__)

RANK_SAMPLE = 4  # adapted layers whose update rank is reported


class RunFailed(RuntimeError):
    """The run failed (its results.json says why) or its config was refused before anything was built
    or written. The message is one line for the user."""


def run(cfg: DictConfig) -> dict[str, Any]:
    """Execute one run described by a composed rankbench config and return its result record."""
    if (problem := _refusal(cfg)) is not None:
        raise RunFailed(problem)  # refused before anything is built; nothing is written
    if (problem := batch_split_problem(cfg.trainer.batch_size, distributed.planned().size)) is not None:
        raise RunFailed(problem)  # a data-parallel run splits each batch evenly over its processes
    if (problem := distributed.strategy_problem(cfg.trainer.strategy, distributed.planned().size, cfg.task)):
        raise RunFailed(problem)  # FSDP alone, or on a model without blocks to shard
    # DDP (torchrun / SLURM tasks): join the group
    distributed.setup(env.resolve_device(cfg.device, _size(cfg)))
    run_dir = distributed.agree(output_dir(cfg))  # rank 0's: Hydra's timestamped dirs may differ by rank
    if is_complete(run_dir):
        log.info("skipping %s: results.json there already records a successful run", run_dir)
        return read_results(run_dir)
    record = _new_record(cfg)
    record["run"]["tuning"] = read_tuning(run_dir)  # how +sweep=tuned chose this run's lr (None otherwise)
    names = _suite_or_error(cfg, run_dir, record)
    if names:
        return _run_suite(cfg, names, run_dir, record)
    logger = None
    try:
        world, device = distributed.setup(env.resolve_device(cfg.device, _size(cfg)))  # cuda:<local rank>
        env.set_threads(cfg.get("threads"))
        record["run"].update(device=env.device_description(device), gpu=env.gpu_info(device),
                             world_size=world.size, strategy=distributed.strategy_name(cfg.trainer.strategy))
        generator = env.seed_everything(cfg.seed)
        task = tasks.build(cfg.task)
        model = task.build_model()
        adaptation = adapt(model, cfg.method, task.target_modules, task.head_prefixes, cfg.budget,
                           cfg.get("budget_alpha", "ratio"), task.untrained_targets)
        _record_adaptation(record, adaptation, model)
        model.to(device)
        logger = make_logger(cfg.logger if world.main else OmegaConf.create({"name": "none"}),  # W&B: rank 0
                             run_dir, record["run"]["id"], record["run"]["config"],
                             _group(cfg), [cfg.method.name, cfg.task.name, _size(cfg)])
        record["run"].update(model_revision=hub_revision(resolve_model_path(cfg.task.model.path)),
                             dataset_revisions=task.dataset_revisions)
        record["run"].update(max_steps=total_steps(task, cfg.trainer), regime=task.regime,
                             memory_savers=_memory_savers(task, cfg.trainer, device))
        probe_before = _before_training(task, model, cfg, device, run_dir, record)
        before = _sample_weights(model, adaptation)
        if cfg.get("init_adapter"):  # a PEFT adapter folder (runners.export): evaluated like our runs
            import_peft_adapter(model, cfg.init_adapter)
        record["cost"], record["history"] = train(model, task, cfg, device, generator, run_dir, logger,
                                                  record["run"]["config_hash"], record["run"]["max_steps"])
        # predicted_cost: runners/memplan.py
        record["cost"].update(predicted_cost(cfg, world.size, gpu=device.type == "cuda"))
        distributed.gather_for_evaluation(model)  # FSDP: whole parameters again, for evaluation and export
        _evaluate(task, model, cfg, device, record["metrics"], suffix="")
        record["metrics"].update(forgetting_metrics(probe_before, _probe(task, model, cfg, device),
                                                    task.forgetting_metric))
        record["metrics"]["delta_rank"] = _delta_ranks(model, before)
        if not world.main:  # rank 0 alone writes; every rank returns the same record
            _finish(record, "success", None)
            return record
        record["params"]["adapter_file_bytes"] = _save_trained(model, adaptation, task.head_prefixes, run_dir)
        _finish(record, "success", None)
        logger.summary({k: record[k] for k in ("params", "cost", "metrics")})
        write_results(run_dir, record)
        remove_checkpoints(run_dir)
        log.info("%s", summary_table(record))
        return record
    except Exception as err:
        _finish(record, "failed", f"{type(err).__name__}: {err}")
        if distributed.is_main():
            write_results(run_dir, record)
        raise RunFailed(f"run failed ({record['run']['error']}); see {run_dir / 'results.json'}") from err
    finally:
        if logger is not None:
            logger.finish(failed=record["run"]["status"] != "success")


def _before_training(task: tasks.Task, model: nn.Module, cfg: DictConfig, device: torch.device, run_dir: Path,
                     record: dict[str, Any]) -> dict[str, float] | None:
    """Evaluate the untrained model into `record` and return its forgetting probe (held-out data). A
    requeued run reads both back from its first attempt (runners.checkpoint.BEFORE) instead."""
    config_hash = record["run"]["config_hash"]
    if (saved := load_before(run_dir, config_hash)) is not None:
        record["metrics"].update(saved["metrics"])
        return saved["probe"]
    _evaluate(task, model, cfg, device, record["metrics"], suffix="_before")
    probe = _probe(task, model, cfg, device, untrained=True)
    if distributed.is_main() and cfg.trainer.checkpoint_every:
        save_before(run_dir, config_hash, record["metrics"], probe)
    return probe


def _refusal(cfg: DictConfig) -> str | None:
    """Input no run can use, in one line: a bad config value, or a device this machine lacks (checked once
    here, not once per dataset of a suite)."""
    if (problem := check_values(cfg)) is not None:
        return problem
    try:
        env.resolve_device(cfg.device, _size(cfg))
    except ValueError as err:
        return str(err)
    return None


def _suite_or_error(cfg: DictConfig, run_dir: Path, record: dict[str, Any]) -> list[str]:
    """The datasets to train one adapter each for (see runners.suite); a bad `dataset=` fails the run."""
    try:
        return suite_datasets(cfg)
    except ValueError as err:
        _finish(record, "failed", f"{type(err).__name__}: {err}")
        if distributed.is_main():
            write_results(run_dir, record)
        raise RunFailed(f"run failed ({record['run']['error']}); see {run_dir / 'results.json'}") from err


def _run_suite(cfg: DictConfig, names: list[str], run_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    """One fresh run per dataset of the suite (the papers' protocol), then the suite's summary record."""
    record = run_suite(cfg, names, run_dir, record, run, RunFailed)
    record["metrics"]["eval_split"] = str(cfg.task.data.eval_split)  # every part scored this split
    errors = record["run"].pop("suite_errors")
    _finish(record, "failed" if errors else "success",
            "; ".join(f"{n}: {e}" for n, e in errors.items()) or None)
    if distributed.is_main():
        write_results(run_dir, record)
        log_suite(cfg.logger, run_dir, record, failed=bool(errors))  # mean and per-dataset table, in W&B
    if errors:
        first, error = next(iter(errors.items()))
        raise RunFailed(f"run failed on {len(errors)} of {len(names)} datasets of the suite "
                        f"({first}: {error}); see {run_dir}/<dataset>/results.json")
    log.info("%s", summary_table(record))
    return record


def train(model: nn.Module, task: tasks.Task, cfg: DictConfig, device: torch.device,
          generator: torch.Generator, run_dir: Path, logger: Any, config_hash: str, max_steps: int
          ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The optimisation loop; returns (cost measurements, history). Resumes from a checkpoint if present."""
    t = cfg.trainer
    params = [p for p in model.parameters() if p.requires_grad]
    memory = PeakMemory(device)
    cost: dict[str, Any] = {"step_time_s": None, "step_time_p90_s": None, "samples_per_s": None,
                            **dict.fromkeys(memory.keys), "activation_bytes": None, "state_bytes": None,
                            "data_wait_s": None, "data_wait_p90_s": None, "train_time_s": 0.0,
                            "flops_per_step": None, "ops_per_step": None,
                            **({"compiled": False, "compile_time_s": None} if t.compile else {})}
    if not params:  # zero-shot CLIP: nothing to train
        return cost, []
    world, data = distributed.current(), task.train_data()
    # FSDP re-registers the parameters as shards: the module is wrapped before the optimizer is built
    step_module = distributed.wrap(model, task, device, len(data.sizes) > 1, t.strategy)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = method_lr(cfg)
    groups = param_groups(model, task.head_prefixes, backbone_lr=lr, head_lr=t.lr)
    optimizer = adamw(groups, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(t, max_steps))
    timer = StepTimer(device, t.timing_warmup)
    state = load_checkpoint(run_dir, model, optimizer, scheduler, config_hash, t.on_bad_checkpoint) or {}
    if "cost" in state:  # requeued after its last step: training is done, only the evaluation was left
        return state["cost"], state["history"]
    start, history = state.get("step", 0), state.get("history", [])
    timer.times, train_time = state.get("step_times", []), state.get("train_time_s", 0.0)
    seed = int(torch.randint(0, 2**62, (), generator=generator))  # the data order's seed, same on every rank
    loader = make_loader(data, t.batch_size, seed, t.num_workers, device, state.get("data"), world.rank,
                         world.size)
    runner = StepRunner(step_module, bool(t.compile), device, cfg.method.name)  # trainer.compile
    counts, counted = StepCounts(), counted_step(start, max_steps)

    def checkpoint(done: int, **final: Any) -> None:  # every rank: FSDP's shards are written by each
        save_checkpoint(run_dir, model, optimizer, scheduler,
                        {"step": done, "history": history, "step_times": timer.times,
                         "data": loader.state_dict(), "train_time_s": train_time, "config_hash": config_hash,
                         **final})

    model.train()
    activations = SavedActivations(model)  # recorded in this process's first step (see _optimizer_step)
    memory.start()
    bar = tqdm(range(start, max_steps), initial=start, total=max_steps, desc="train", mininterval=2,
               disable=not world.main)
    with PreemptionGuard() as preemption, contextlib.closing(loader):
        for step in bar:
            micro_batches = loader.take(t.grad_accum)  # data wait timed apart: step time is compute only
            timer.start()
            one_step = functools.partial(_optimizer_step, micro_batches=micro_batches, optimizer=optimizer,
                                         params=params, t=t, device=device,
                                         activations=activations if step == start else None)
            with counts.counting() if step == counted else contextlib.nullcontext():
                loss = runner.run(one_step, eager=step in (start, counted))  # the measured steps run eager
            scheduler.step()
            dt = timer.stop(timed=runner.steady and step != counted)
            train_time += dt
            loss, stop = distributed.mean_and_any(loss, preemption.requested, device)  # same on every rank
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step + 1}; lower trainer.lr={lr}?")
            done = step + 1
            if done % t.log_every == 0 or done == max_steps:
                entry = {"step": done, "loss": loss, "lr": optimizer.param_groups[0]["lr"], "step_time_s": dt}
                history.append(entry)
                logger.log(entry, step=done)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}", s=f"{dt:.3f}",
                            refresh=False)
            periodic = t.checkpoint_every and done % t.checkpoint_every == 0 and done < max_steps
            if periodic or stop:
                checkpoint(done)
            if stop:
                preemption.hand_over()  # submitit requeues the job; the requeued run resumes at `done`
    model.eval()
    cost.update(timer.summary(t.batch_size * t.grad_accum))
    cost.update(wait_summary(loader.waits, t.timing_warmup))
    cost.update(memory.figures())
    if start < max_steps:
        cost.update(activation_bytes=activations.bytes, state_bytes=state_bytes(params, optimizer))
        cost.update(counts.figures())
    if t.compile:
        cost.update(compiled=runner.status() == "compiled",
                    compile_time_s=runner.compile_time_s(cost["step_time_s"]))
        log.info("trainer.compile: %s", runner.status())
    cost["train_time_s"] = train_time
    if t.checkpoint_every and start < max_steps:  # the final evaluation can be preempted too
        checkpoint(max_steps, cost=cost)
    return cost, history


def counted_step(start: int, max_steps: int) -> int:
    """The step whose FLOPs and operators are counted (runners.metrics.StepCounts): the process's second,
    since the first also creates the optimizer's state; its first when it runs one only."""
    return start + 1 if start + 1 < max_steps else start


def method_lr(cfg: DictConfig) -> float:
    """The method's learning rate: `method.lr` if set, else the task's `trainer.method_lr.<method>`
    default, else `trainer.lr`. Methods differ in their best lr (`+sweep=lr` finds it)."""
    per_method = cfg.trainer.get("method_lr") or {}
    return float(cfg.method.get("lr") or per_method.get(cfg.method.name) or cfg.trainer.lr)


def adamw(params: Any, **kwargs: Any) -> torch.optim.AdamW:
    """AdamW with the fused kernel (CPU and CUDA): one kernel for all parameter tensors. The default
    CPU path loops over tensors in Python, which cost LoHa (4 tensors per layer) 5.6 ms a step against
    LoRA's 3.0 ms (2 per layer) on the tiny CLIP -- a charge for tensor count, not for the method."""
    return torch.optim.AdamW(params, fused=True, **kwargs)


def param_groups(model: nn.Module, head_prefixes: list[str], backbone_lr: float, head_lr: float
                 ) -> list[dict[str, Any]]:
    """Backbone (adapter or full) parameters at the method's lr; the task head at the trainer's lr for
    every method, so a small full-fine-tuning lr does not also starve the head."""
    backbone, head = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head if is_head(name, head_prefixes) else backbone).append(param)
    groups = ({"params": backbone, "lr": backbone_lr}, {"params": head, "lr": head_lr})
    return [g for g in groups if g["params"]]


def _optimizer_step(step_module: nn.Module, micro_batches: list[Any], optimizer: torch.optim.Optimizer,
                    params: list[nn.Parameter], t: DictConfig, device: torch.device,
                    activations: SavedActivations | None = None) -> float:
    """One optimizer step over already fetched micro-batches; returns their mean loss (this process's).

    `step_module(batch)` is the task's loss (runners.distributed.wrap: inside DDP when several processes
    train, whose gradients are averaged in the last micro-batch's backward only). With `activations`,
    what autograd saves in the first micro-batch's forward is recorded (micro-batch graphs never
    coexist: each is freed by its backward). The hooks' small Python cost lands in one step, which the
    step-time median absorbs."""
    optimizer.zero_grad(set_to_none=True)
    total, last = 0.0, len(micro_batches) - 1
    for micro, batch in enumerate(micro_batches):
        batch = _to_device(batch, device)
        record = activations is not None and micro == 0
        with distributed.accumulating(step_module, last=micro == last):
            with autocast(device, t.bf16), activations.recording() if record else contextlib.nullcontext():
                loss = step_module(batch) / len(micro_batches)
            loss.backward()
        total += float(loss.detach())
    if t.grad_clip:
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
    optimizer.step()
    return total


SCHEDULES = ("cosine", "linear", "constant")


def lr_schedule(t: DictConfig, total: int):
    """lr multiplier of `trainer`: linear warm-up over `warmup_steps` (or `warmup_ratio` of the run),
    then `schedule` (cosine | linear | constant) from the peak down to `final_lr_ratio` x peak at `total`."""
    ratio = t.get("warmup_ratio")
    warmup = round(float(ratio) * total) if ratio is not None else int(t.warmup_steps)
    return warmup_decay(warmup, total, str(t.schedule), float(t.final_lr_ratio))


def warmup_decay(warmup: int, total: int, schedule: str = "cosine", final: float = 0.0):
    """lr multiplier: linear warm-up over `warmup` steps, then `schedule` decay to `final` at `total`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"trainer.schedule={schedule!r} is not a schedule; valid: {', '.join(SCHEDULES)}")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        shape = {"cosine": 0.5 * (1.0 + math.cos(math.pi * progress)), "linear": 1.0 - progress,
                 "constant": 1.0}[schedule]
        return final + (1.0 - final) * shape if schedule != "constant" else 1.0
    return factor


def warmup_cosine(warmup: int, total: int):
    """lr multiplier: linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    return warmup_decay(warmup, total, "cosine", 0.0)


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA only; CPU runs stay in fp32 so they are exactly reproducible."""
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _command() -> str | None:
    """The command line that launched this job (per job of a sweep), when running under Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return " ".join(["python run.py", *HydraConfig.get().overrides.task])


def output_dir(cfg: DictConfig) -> Path:
    """Hydra's per-job output dir (never the cwd: concurrent jobs would overwrite each other)."""
    if cfg.get("out_dir"):
        return Path(cfg.out_dir)
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def summary_table(record: dict[str, Any]) -> str:
    """A short human-readable table of the run's headline numbers."""
    r, m, p, c = record["run"], record["metrics"], record["params"], record["cost"]
    mem_key = "peak_mem_growth_bytes" if c.get("peak_mem_growth_bytes") is not None else "peak_rss_bytes"
    rows = [("dataset", "before", "after")]
    rows += [(d, f"{m['per_dataset_before'][d]:.3f}", f"{acc:.3f}") for d, acc in m["per_dataset"].items()]
    rows.append(("mean", f"{m['accuracy_before']:.3f}", f"{m['accuracy']:.3f}"))
    width = max(len(row[0]) for row in rows)
    lines = [f"{r['method']} on {r['task']} ({r['size']}, seed {r['seed']}) hp={r['hp']}"]
    lines += [f"  {a:<{width}}  {b:>7}  {c_:>7}" for a, b, c_ in rows]
    step = c["step_time_s"]
    mem = c.get(mem_key)
    lines.append(f"  trainable params {p['trainable']:,} (+{p['head_trainable']:,} head) of {p['total']:,}"
                 + (f", budget error {p['budget_error']:+.2%}" if p["budget_error"] is not None else ""))
    lines.append(f"  step time {step * 1e3:.1f} ms" if step else "  step time n/a (nothing trained)")
    lines[-1] += f", {mem_key} {mem / 2**20:.1f} MiB" if mem is not None else ""
    lines.append(f"  train time {c['train_time_s']:.1f} s")
    return "\n".join(lines)


# --- helpers ---------------------------------------------------------------------------------------

def total_steps(task: tasks.Task, t: DictConfig) -> int:
    """Optimizer steps of the run: `trainer.max_steps`, or what the task's configured epochs amount to."""
    steps = t.max_steps if t.max_steps is not None else task.planned_steps(t.batch_size, t.grad_accum)
    if steps is None or steps < 0 or (steps == 0 and t.max_steps is None):
        raise ValueError("no training length: set trainer.max_steps=<int> (0: evaluate only), or "
                         "task.data.epochs for this task")
    return int(steps)


def _memory_savers(task: tasks.Task, t: DictConfig, device: torch.device) -> dict[str, Any]:
    return {**task.memory_savers, "grad_accum": int(t.grad_accum),
            "bf16_autocast": bool(t.bf16 and device.type == "cuda")}


def _evaluate(task: tasks.Task, model: nn.Module, cfg: DictConfig, device: torch.device,
              metrics: dict[str, Any], suffix: str) -> None:
    """Every metric per dataset into `metrics`; `per_dataset` holds each dataset's primary one
    (accuracy, except e.g. STS-B's Pearson r)."""
    model.eval()
    with torch.no_grad(), autocast(device, cfg.trainer.bf16):
        full = task.evaluate_metrics(model, cfg.trainer.eval_batch_size)
    metrics["per_dataset" + suffix] = {d: float(m[task.primary_metric(d)]) for d, m in full.items()}
    metrics["per_dataset_metrics" + suffix] = {d: {k: float(v) for k, v in m.items()}
                                               for d, m in full.items()}
    metrics["eval_split"] = task.eval_split  # test (reported) or validation (hyper-parameter selection)
    metrics["eval_examples"] = task.eval_examples()


def _probe(task: tasks.Task, model: nn.Module, cfg: DictConfig, device: torch.device, untrained: bool = False
           ) -> dict[str, float] | None:
    """The task's forgetting probe (tasks/forgetting.py), under the same precision as `_evaluate`."""
    model.eval()
    with torch.no_grad(), autocast(device, cfg.trainer.bf16):
        return task.forgetting_probe(model, cfg.trainer.eval_batch_size, untrained=untrained)


TUNING_FILE = "tuning.json"  # written into a final run's directory by +sweep=tuned (runners/sweeper.py)


def read_tuning(run_dir: Path) -> dict[str, Any] | None:
    """The lr selection behind this run ({metric, split, chosen_lr, candidates}) when a tuned sweep
    launched it, copied into results.json as run.tuning; None for any other run."""
    path = Path(run_dir) / TUNING_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _sample_names(names: list[str]) -> list[str]:
    if len(names) <= RANK_SAMPLE:
        return list(names)
    idx = [round(i * (len(names) - 1) / (RANK_SAMPLE - 1)) for i in range(RANK_SAMPLE)]
    return [names[i] for i in idx]


@torch.no_grad()
def _sample_weights(model: nn.Module, adaptation: Adaptation) -> dict[str, torch.Tensor | None]:
    """A few adapted (or, for full, targeted) layers whose rank(dW) is reported at the end, with an fp32
    copy of each plain layer's weight (None for an adapter: its dW is its own)."""
    layers = {n: model.get_submodule(n) for n in _sample_names(adaptation.rank_layers)}
    return {n: None if _is_adapter(m) else m.weight.detach().float().cpu().clone() for n, m in layers.items()}


@torch.no_grad()
def _delta_ranks(model: nn.Module, before: dict[str, torch.Tensor | None]) -> dict[str, dict[str, float]]:
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


def _save_trained(model: nn.Module, adaptation: Adaptation, head_prefixes: list[str], run_dir: Path) -> int:
    """Save what was trained; returns the adapter file size in bytes (0 when there is no adapter).
    The task head goes to run_dir/head.safetensors (outside adapter/: not counted in the adapter size)."""
    save_head(model, head_prefixes, run_dir)
    if adaptation.wrapped:
        path = run_dir / "adapter"
        methods.save_adapter(model, path)
        return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    return 0


def _config_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)


def _config_hash(config: dict[str, Any]) -> str:
    """Identity of a run: everything that changes its numbers (not where or how it is logged)."""
    keep = {k: v for k, v in config.items() if k not in ("logger", "out_dir", "sweep", "plan")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _size(cfg: DictConfig) -> str:
    return str(cfg.size.name) if "size" in cfg else "tiny"


def _group(cfg: DictConfig) -> str | None:
    return cfg.logger.get("group") or (cfg.get("sweep") or {}).get("name")


def _new_record(cfg: DictConfig) -> dict[str, Any]:
    """The record of a run about to start, built from runners.schema; the run fills it as it goes and
    `_finish` checks it against the schema before it is written."""
    config = _config_dict(cfg)
    config_hash = _config_hash(config)
    commit, dirty = env.git_state()
    budget = cfg.budget if cfg.budget is not None else "nobudget"
    # an unknown method gets no kind: adapt() refuses it with the valid names, and the run fails there
    known = cfg.method.name in method_names()
    info = method_info(cfg.method.name) if known else {"kind": None, "label": None}
    run_id = f"{cfg.task.name}-{cfg.method.name}-{_size(cfg)}-{budget}-s{cfg.seed}-{config_hash[:8]}"
    run = Run(id=run_id, method=cfg.method.name, method_kind=info["kind"], method_label=info["label"],
              task=cfg.task.name,
              dataset=cfg.get("dataset"), size=_size(cfg), model=str(cfg.task.model.path), seed=cfg.seed,
              lr=method_lr(cfg), budget=cfg.budget, protocol=protocol_of(config), command=_command(),
              config=config, config_hash=config_hash, git_commit=commit, git_dirty=dirty,
              versions=env.package_versions(), started_at=_now(), status="running")
    return Record(run=run).to_dict()


def _record_adaptation(record: dict[str, Any], a: Adaptation, model: nn.Module) -> None:
    record["run"].update(hp=a.hp, budget_target=a.budget_target)
    record["params"].update(asdict(Params(
        trainable=a.backbone_trainable, head_trainable=a.head_trainable,
        total=sum(p.numel() for p in model.parameters()), budget_target=a.budget_target,
        budget_error=a.budget_error, budget_reached=a.budget_reached, per_layer=a.per_layer)))


def _finish(record: dict[str, Any], status: str, error: str | None) -> None:
    """Close the record and check it against runners.schema (filling what the run did not reach)."""
    record["run"].update(status=status, error=error, finished_at=_now())
    m = record["metrics"]
    for key, src in (("accuracy", "per_dataset"), ("accuracy_before", "per_dataset_before")):
        if m.get(src):
            m[key] = sum(m[src].values()) / len(m[src])
    try:
        checked = Record.from_dict(record).to_dict()
    except ValueError as err:
        if status == "success":
            raise
        log.error("the record of this failed run does not fit results schema %d (%s); written as it is",
                  SCHEMA, err)
        return
    record.clear()
    record.update(checked)


def protocol_of(config: dict[str, Any]) -> dict[str, Any]:
    """The paper protocol the task config follows and its deliberate deviations (`task.protocol`:
    `source`, a list of `deviations`, each {what, why}, and `notes` on facts that could not be checked),
    so results never hide what differed."""
    protocol = (config.get("task") or {}).get("protocol") or {}
    return {"source": protocol.get("source"), "deviations": list(protocol.get("deviations") or []),
            "notes": list(protocol.get("notes") or [])}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
