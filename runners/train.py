"""`run(cfg)`: one rankbench run -- a whole suite or a single adapter -- read top to bottom.

run: refuse unusable input -> device and process group, once -> a suite (one fresh single run per dataset,
then the mean) or a single run. A single run: seed -> task -> adapt (inject / full / none) -> evaluate
before -> `train` (AdamW + warm-up/schedule, measured) -> evaluate after -> save adapter -> results.json
-> logger. Method-specific behaviour lives in `methods/` and `runners/engine/adapt.py`, never in this loop;
the record is built in runners/record/builder.py, the optimizer in runners/engine/optimizer.py.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
from pathlib import Path
from typing import Any, NoReturn

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

import tasks
from runners.engine import distributed, env
from runners.engine import optimizer as optim
from runners.engine.adapt import Adaptation, adapt, method_info, method_names
from runners.engine.checkpoint import (
    PreemptionGuard,
    load_before,
    load_checkpoint,
    remove_checkpoints,
    save_before,
    save_checkpoint,
)
from runners.engine.compiled import StepRunner
from runners.engine.config import check_values
from runners.engine.distributed import World
from runners.engine.loader import batch_split_problem, make_loader, wait_summary
from runners.engine.measure import (
    PeakMemory,
    SavedActivations,
    StepCounts,
    StepTimer,
    delta_ranks,
    sample_weights,
    state_bytes,
)
from runners.engine.memplan import predicted_cost
from runners.engine.peft_files import import_peft_adapter, save_trained
from runners.engine.suite import dataset_config, suite_datasets, summary_record
from runners.record.builder import finish, new_record, record_adaptation, size_name, summary_table
from runners.record.logger import log_suite, make_logger, suite_group
from runners.record.results import is_complete, read_results, read_tuning, write_results
from tasks.forgetting import forgetting_metrics
from tasks.models import hub_revision, resolve_model_path

log = logging.getLogger(__name__)

class RunFailed(RuntimeError):
    """The run failed (its results.json says why) or its config was refused before anything was built
    or written. The message is one line for the user."""


def run(cfg: DictConfig) -> dict[str, Any]:
    """Execute the run a composed rankbench config describes and return its result record: a suite
    (one fresh adapter per dataset, then the mean) or a single run."""
    device = _usable_device(cfg)  # refused before anything is built; nothing is written
    world, device = distributed.setup(device)  # DDP (torchrun / SLURM tasks): join the group; cuda:<rank>
    run_dir = distributed.agree(output_dir(cfg.out_dir))  # rank 0's: Hydra's dirs may differ by rank
    if is_complete(run_dir):
        return _finished(run_dir)
    record = _start_record(cfg, run_dir)
    datasets = _suite_or_error(cfg, run_dir, record)
    if datasets:
        return _run_suite(cfg, datasets, run_dir, record, world, device)
    return _run_single(cfg, run_dir, record, world, device)


def _usable_device(cfg: DictConfig) -> torch.device:
    """The configured device, after refusing in one line any input no run can use: a bad config value,
    a device this machine lacks, a batch that does not split over the processes, FSDP where it cannot
    shard. Checked once per command, not once per dataset of a suite."""
    if (problem := check_values(cfg)) is not None:
        raise RunFailed(problem)
    try:
        device = env.resolve_device(cfg.device, size_name(cfg))
    except ValueError as err:
        raise RunFailed(str(err)) from None
    processes = distributed.planned().size
    if (problem := batch_split_problem(cfg.trainer.batch_size, processes)) is not None:
        raise RunFailed(problem)  # a data-parallel run splits each batch evenly over its processes
    if (problem := distributed.strategy_problem(cfg.trainer.strategy, processes, cfg.task)) is not None:
        raise RunFailed(problem)  # FSDP alone, or on a model without blocks to shard
    return device


def _finished(run_dir: Path) -> dict[str, Any]:
    log.info("skipping %s: results.json there already records a successful run", run_dir)
    return read_results(run_dir)


def _start_record(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """The run's record (runners/record/builder.py), with how +sweep=tuned chose its lr (None otherwise)."""
    # an unknown method gets no kind: adapt() refuses it with the valid names, and the run fails there
    known = cfg.method.name in method_names()
    info = method_info(cfg.method.name) if known else {"kind": None, "label": None}
    record = new_record(cfg, info, optim.method_lr(cfg))
    record["run"]["tuning"] = read_tuning(run_dir)
    return record


def _suite_or_error(cfg: DictConfig, run_dir: Path, record: dict[str, Any]) -> list[str]:
    """The datasets to train one adapter each for (runners/engine/suite.py); a bad `dataset=` fails the
    run."""
    try:
        return suite_datasets(cfg.task)
    except ValueError as err:
        _fail(record, run_dir, err)


def _fail(record: dict[str, Any], run_dir: Path, err: Exception) -> NoReturn:
    """Close the record as failed, write it (rank 0) and raise the user's one line."""
    finish(record, "failed", f"{type(err).__name__}: {err}")
    if distributed.is_main():
        write_results(run_dir, record)
    raise RunFailed(f"run failed ({record['run']['error']}); see {run_dir / 'results.json'}") from err


# --- a suite: one fresh single run per dataset (the papers' protocol), then the summary ---------------

def _run_suite(cfg: DictConfig, names: list[str], run_dir: Path, record: dict[str, Any], world: World,
               device: torch.device) -> dict[str, Any]:
    """Every dataset of the suite in `run_dir/<dataset>` (finished ones skipped; a failing one does not
    stop the others), then the suite's summary record: each dataset, their mean, the failures."""
    records, errors = {}, {}
    group = suite_group(cfg.logger, record["run"]["id"])
    for i, name in enumerate(names, 1):
        log.info("suite %s: dataset %d of %d: %s", cfg.task.name, i, len(names), name)
        try:
            records[name] = _run_part(dataset_config(cfg, name, run_dir, group), world, device)
        except RunFailed as err:  # the dataset's own results.json holds the details
            cause = err.__cause__ or err
            errors[name] = f"{type(cause).__name__}: {cause}"
    summary = summary_record(record, names, records, errors)
    return _close_suite(summary, names, run_dir, str(cfg.task.data.eval_split), cfg.logger)


def _run_part(cfg: DictConfig, world: World, device: torch.device) -> dict[str, Any]:
    """One dataset of a suite: a single run in its own directory (skipped when it already succeeded)."""
    run_dir = output_dir(cfg.out_dir)
    if is_complete(run_dir):
        return _finished(run_dir)
    return _run_single(cfg, run_dir, _start_record(cfg, run_dir), world, device)


def _close_suite(record: dict[str, Any], names: list[str], run_dir: Path, eval_split: str,
                 logger_cfg: DictConfig) -> dict[str, Any]:
    """Write the suite's record (and its W&B summary run, `logger_cfg`); raise naming the first failed
    dataset."""
    record["metrics"]["eval_split"] = eval_split  # every part scored this split
    errors = record["run"].pop("suite_errors")
    finish(record, "failed" if errors else "success",
           "; ".join(f"{n}: {e}" for n, e in errors.items()) or None)
    if distributed.is_main():
        write_results(run_dir, record)
        log_suite(logger_cfg, run_dir, record, failed=bool(errors))  # mean and per-dataset table, in W&B
    if errors:
        first, error = next(iter(errors.items()))
        raise RunFailed(f"run failed on {len(errors)} of {len(names)} datasets of the suite "
                        f"({first}: {error}); see {run_dir}/<dataset>/results.json")
    log.info("%s", summary_table(record))
    return record


# --- a single run -------------------------------------------------------------------------------------

def _run_single(cfg: DictConfig, run_dir: Path, record: dict[str, Any], world: World, device: torch.device
                ) -> dict[str, Any]:
    """Build, train and evaluate one adapter; results.json records the outcome, success or failure."""
    logger = None
    try:
        env.set_threads(cfg.threads)
        record["run"].update(device=env.device_description(device), gpu=env.gpu_info(device),
                             world_size=world.size, strategy=distributed.strategy_name(cfg.trainer.strategy))
        generator = env.seed_everything(cfg.seed)
        task = tasks.build(cfg.task)
        model = task.build_model()
        adaptation = adapt(model, cfg.method, task.target_modules, task.head_prefixes, cfg.budget,
                           cfg.budget_alpha, task.untrained_targets)
        record_adaptation(record, adaptation, sum(p.numel() for p in model.parameters()))
        model.to(device)
        logger = _logger(cfg, world, run_dir, record)
        _record_task(record, cfg.trainer, str(cfg.task.model.path), task, device)
        _train_and_evaluate(cfg, task, model, adaptation, device, generator, run_dir, record, logger)
        if not world.main:  # rank 0 alone writes; every rank returns the same record
            finish(record, "success", None)
            return record
        return _save(record, model, adaptation, task.head_prefixes, run_dir, logger)
    except Exception as err:
        _fail(record, run_dir, err)
    finally:
        if logger is not None:
            logger.finish(failed=record["run"]["status"] != "success")


def _logger(cfg: DictConfig, world: World, run_dir: Path, record: dict[str, Any]) -> Any:
    """W&B (or none) for rank 0; the other ranks log nothing."""
    logger_cfg = cfg.logger if world.main else OmegaConf.create({"name": "none"})
    group = cfg.logger.get("group") or (cfg.get("sweep") or {}).get("name")
    return make_logger(logger_cfg, run_dir, record["run"]["id"], record["run"]["config"], group,
                       [cfg.method.name, cfg.task.name, size_name(cfg)])


def _record_task(record: dict[str, Any], t: DictConfig, model_path: str, task: tasks.Task,
                 device: torch.device) -> None:
    """What the task resolved to under trainer config `t`: model and dataset revisions, training length,
    regime, memory savers."""
    record["run"].update(model_revision=hub_revision(resolve_model_path(model_path)),
                         dataset_revisions=task.dataset_revisions)
    record["run"].update(max_steps=total_steps(task, t), regime=task.regime,
                         memory_savers={**task.memory_savers, "grad_accum": int(t.grad_accum),
                                        "bf16_autocast": bool(t.bf16 and device.type == "cuda")})


def _train_and_evaluate(cfg: DictConfig, task: tasks.Task, model: nn.Module, adaptation: Adaptation,
                        device: torch.device, generator: torch.Generator, run_dir: Path,
                        record: dict[str, Any], logger: Any) -> None:
    """Evaluate before, train, evaluate after: cost, history and metrics into `record`."""
    t, metrics = cfg.trainer, record["metrics"]
    probe_before = _before_training(task, model, t, device, run_dir, record)
    before = sample_weights(model, adaptation.rank_layers)
    if cfg.get("init_adapter"):  # a PEFT adapter folder (runners/engine/peft_files.py): evaluated like ours
        import_peft_adapter(model, cfg.init_adapter)
    record["cost"], record["history"] = train(model, task, t, optim.method_lr(cfg), cfg.method.name, device,
                                              generator, run_dir, logger, record["run"]["config_hash"],
                                              record["run"]["max_steps"])
    record["cost"].update(predicted_cost(cfg, distributed.current().size, gpu=device.type == "cuda"))
    distributed.gather_for_evaluation(model)  # FSDP: whole parameters again, for evaluation and export
    _evaluate(task, model, t, device, metrics, suffix="")
    metrics.update(forgetting_metrics(probe_before, _probe(task, model, t, device), task.forgetting_metric))
    metrics["delta_rank"] = delta_ranks(model, before)


def _save(record: dict[str, Any], model: nn.Module, adaptation: Adaptation, head_prefixes: list[str],
          run_dir: Path, logger: Any) -> dict[str, Any]:
    """Rank 0: the adapter and head, the closed record to results.json and W&B, checkpoints removed."""
    record["params"]["adapter_file_bytes"] = save_trained(model, bool(adaptation.wrapped), head_prefixes,
                                                              run_dir)
    finish(record, "success", None)
    logger.summary({k: record[k] for k in ("params", "cost", "metrics")})
    write_results(run_dir, record)
    remove_checkpoints(run_dir)
    log.info("%s", summary_table(record))
    return record


def _before_training(task: tasks.Task, model: nn.Module, t: DictConfig, device: torch.device, run_dir: Path,
                     record: dict[str, Any]) -> dict[str, float] | None:
    """Evaluate the untrained model into `record` and return its forgetting probe (held-out data). A
    requeued run reads both back from its first attempt (runners.engine.checkpoint.BEFORE) instead."""
    config_hash = record["run"]["config_hash"]
    if (saved := load_before(run_dir, config_hash)) is not None:
        record["metrics"].update(saved["metrics"])
        return saved["probe"]
    _evaluate(task, model, t, device, record["metrics"], suffix="_before")
    probe = _probe(task, model, t, device, untrained=True)
    if distributed.is_main() and t.checkpoint_every:
        save_before(run_dir, config_hash, record["metrics"], probe)
    return probe


# --- the training loop --------------------------------------------------------------------------------

def train(model: nn.Module, task: tasks.Task, t: DictConfig, lr: float, method: str, device: torch.device,
          generator: torch.Generator, run_dir: Path, logger: Any, config_hash: str, max_steps: int
          ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The optimisation loop under `trainer` config `t`, the backbone at `lr`; returns (cost
    measurements, history). Resumes from a checkpoint if present."""
    memory = PeakMemory(device)
    cost = _unmeasured(memory, t.compile)
    if not any(p.requires_grad for p in model.parameters()):  # zero-shot CLIP: nothing to train
        return cost, []
    world, data = distributed.current(), task.train_data()
    # FSDP re-registers the parameters as shards: the module is wrapped before the optimizer is built
    step_module = distributed.wrap(model, task, device, len(data.sizes) > 1, t.strategy)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = optim.build(model, task.head_prefixes, lr, t, max_steps)
    timer = StepTimer(device, t.timing_warmup)
    state = load_checkpoint(run_dir, model, optimizer, scheduler, config_hash, t.on_bad_checkpoint) or {}
    if "cost" in state:  # requeued after its last step: training is done, only the evaluation was left
        return state["cost"], state["history"]
    start, history = state.get("step", 0), state.get("history", [])
    timer.times, train_time = state.get("step_times", []), state.get("train_time_s", 0.0)
    seed = int(torch.randint(0, 2**62, (), generator=generator))  # the data order's seed, same on every rank
    loader = make_loader(data, t.batch_size, seed, t.num_workers, device, state.get("data"), world.rank,
                         world.size)
    runner = StepRunner(step_module, bool(t.compile), device, method)  # trainer.compile
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


def _unmeasured(memory: PeakMemory, compile_step: bool) -> dict[str, Any]:
    """The cost figures of a run before (or without) training: every one None, train time 0."""
    return {"step_time_s": None, "step_time_p90_s": None, "samples_per_s": None,
            **dict.fromkeys(memory.keys), "activation_bytes": None, "state_bytes": None,
            "data_wait_s": None, "data_wait_p90_s": None, "train_time_s": 0.0,
            "flops_per_step": None, "ops_per_step": None,
            **({"compiled": False, "compile_time_s": None} if compile_step else {})}


def counted_step(start: int, max_steps: int) -> int:
    """The step whose FLOPs and operators are counted (runners.engine.measure.StepCounts): the process's
    second, since the first also creates the optimizer's state; its first when it runs one only."""
    return start + 1 if start + 1 < max_steps else start


def _optimizer_step(step_module: nn.Module, micro_batches: list[Any], optimizer: torch.optim.Optimizer,
                    params: list[nn.Parameter], t: DictConfig, device: torch.device,
                    activations: SavedActivations | None = None) -> float:
    """One optimizer step over already fetched micro-batches; returns their mean loss (this process's).

    `step_module(batch)` is the task's loss (runners.engine.distributed.wrap: inside DDP when several
    processes train, whose gradients are averaged in the last micro-batch's backward only). With
    `activations`, what autograd saves in the first micro-batch's forward is recorded (micro-batch graphs
    never coexist: each is freed by its backward). The hooks' small Python cost lands in one step, which
    the step-time median absorbs."""
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


# --- helpers ------------------------------------------------------------------------------------------

def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA only; CPU runs stay in fp32 so they are exactly reproducible."""
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def output_dir(out_dir: str | None) -> Path:
    """`out_dir`, else Hydra's per-job output dir (never the cwd: concurrent jobs would overwrite each
    other)."""
    if out_dir:
        return Path(out_dir)
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def total_steps(task: tasks.Task, t: DictConfig) -> int:
    """Optimizer steps of the run: `trainer.max_steps`, or what the task's configured epochs amount to."""
    steps = t.max_steps if t.max_steps is not None else task.planned_steps(t.batch_size, t.grad_accum)
    if steps is None or steps < 0 or (steps == 0 and t.max_steps is None):
        raise ValueError("no training length: set trainer.max_steps=<int> (0: evaluate only), or "
                         "task.data.epochs for this task")
    return int(steps)


def _evaluate(task: tasks.Task, model: nn.Module, t: DictConfig, device: torch.device,
              metrics: dict[str, Any], suffix: str) -> None:
    """Every metric per dataset into `metrics`; `per_dataset` holds each dataset's primary one
    (accuracy, except e.g. STS-B's Pearson r). `t`: the trainer config (precision, batch size)."""
    model.eval()
    with torch.no_grad(), autocast(device, t.bf16):
        full = task.evaluate_metrics(model, t.eval_batch_size)
    metrics["per_dataset" + suffix] = {d: float(m[task.primary_metric(d)]) for d, m in full.items()}
    metrics["per_dataset_metrics" + suffix] = {d: {k: float(v) for k, v in m.items()}
                                               for d, m in full.items()}
    metrics["eval_split"] = task.eval_split  # test (reported) or validation (hyper-parameter selection)
    metrics["eval_examples"] = task.eval_examples()


def _probe(task: tasks.Task, model: nn.Module, t: DictConfig, device: torch.device, untrained: bool = False
           ) -> dict[str, float] | None:
    """The task's forgetting probe (tasks/forgetting.py), under the same precision as `_evaluate`."""
    model.eval()
    with torch.no_grad(), autocast(device, t.bf16):
        return task.forgetting_probe(model, t.eval_batch_size, untrained=untrained)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch
