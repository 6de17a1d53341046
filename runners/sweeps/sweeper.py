"""Sweeps as config files: expand the `sweep` node into jobs, skip the ones that already finished.

`python run.py -m +sweep=budget task=clip` composes `conf/sweep/budget.yaml`, which selects this sweeper
(`hydra/sweeper=rankbench`). Hydra's basic sweeper can only take cartesian products of command-line
values; a benchmark sweep is not one (references run once per seed, hyper-parameter axes differ per
method), so the axes live in the `sweep` config node and `expand` turns them into job override lists:

    seeds x datasets x (methods x budgets x hp[method]  +  references x hp[reference])

`datasets` is the suite of the composed task (one job per dataset, the papers' protocol: a fresh adapter
per dataset; `dataset=<name>` on the command line narrows it to one); tasks that train one adapter for
all their evaluation sets (commonsense) are not expanded.

Every job gets a deterministic directory `<hydra.sweep.dir>/<job name>` (e.g.
`multirun/budget/clip-tiny/lora-lora8-s0`), so re-running a sweep finds its earlier runs: jobs whose
`results.json` says success are skipped, failed or missing ones run again. Extra command-line sweeps
(`trainer.lr=1e-3,1e-4`) still multiply every job, as with the basic sweeper.

Hydra instantiates sweepers only from the `hydra_plugins` namespace, which the project's fixed layout
cannot hold as a top-level folder; `RegisterSweeper` (a Hydra callback, configured next to the sweeper
in conf/hydra/sweeper/rankbench.yaml) publishes the class there before Hydra looks it up.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import sys
import types
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from runners.engine.suite import sweep_datasets
from runners.record.results import TUNING_FILE, is_complete, read_results
from runners.sweeps.presubmit import launch_problems, mixed_gpu_problem, unreachable_pairs

log = logging.getLogger(__name__)

AXIS_KEYS = ("method", "budget", "seed")  # set per job by the sweep, never on its command line
IGNORED_IN_DIFF = ("logger", "out_dir", "sweep", "plan")  # do not change a run's numbers
PLUGIN_MODULE = "hydra_plugins.rankbench_sweeper"


class SweepError(HydraException):
    """A sweep that cannot run as written; the message is one line saying what to change."""


@dataclass(frozen=True)
class Job:
    """One run of a sweep: its directory name and the overrides that make it."""

    name: str
    overrides: tuple[str, ...]


# --- expansion (pure) ------------------------------------------------------------------------------

def expand(spec: Mapping[str, Any]) -> list[Job]:
    """Jobs of a sweep spec (the `sweep` config node as a dict, plus `datasets`: the suite to expand
    over, if any), seed-major so early seeds finish first."""
    hp = spec.get("hp") or {}
    jobs = []
    for seed in spec.get("seeds") or [0]:
        for dataset in spec.get("datasets") or [None]:
            for method, budget in _adapter_axes(spec):
                jobs += [_job(method, budget, seed, combo, dataset) for combo in _hp_combos(hp.get(method))]
            for reference in spec.get("references") or []:
                jobs += [_job(reference, None, seed, combo, dataset)
                         for combo in _hp_combos(hp.get(reference))]
    return jobs


def _adapter_axes(spec: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(method, budget) pairs of the sweep, less those in `spec["unreachable"]` (a structure that cannot
    reach the budget on this model: such a run would only fail with that line, see `unreachable_pairs`)."""
    skip = {(m, str(b)) for m, b in spec.get("unreachable") or []}
    return [(m, b) for m in spec.get("methods") or [] for b in spec.get("budgets") or [None]
            if (m, str(b)) not in skip]


def _hp_combos(axes: Mapping[str, Sequence[Any]] | None) -> list[tuple[tuple[str, Any], ...]]:
    """Cartesian product of one method's hyper-parameter axes ({"r": [4, 8]} -> ((r,4),), ((r,8),))."""
    if not axes:
        return [()]
    keys = list(axes)
    return [tuple(zip(keys, values, strict=True)) for values in itertools.product(*(axes[k] for k in keys))]


def _job(method: str, budget: Any, seed: int, combo: tuple[tuple[str, Any], ...],
         dataset: str | None = None) -> Job:
    """A job named `[<dataset>/]<method>[-<budget>][-<hp><value>]-s<seed>` (its directory)."""
    parts = [method, *([str(budget)] if budget is not None else []), *(f"{k}{v}" for k, v in combo)]
    overrides = [f"method={method}", f"budget={'null' if budget is None else budget}", f"seed={seed}"]
    overrides += [f"++method.{k}={v}" for k, v in combo] + ([f"dataset={dataset}"] if dataset else [])
    return Job((f"{dataset}/" if dataset else "") + "-".join([*parts, f"s{seed}"]), tuple(overrides))


def validate(spec: Mapping[str, Any], adapters: Iterable[str], references: Iterable[str],
             configs: Iterable[str]) -> None:
    """Raise SweepError (one line) for a method name that is not registered or has no config file."""
    adapters, references, configs = sorted(adapters), sorted(references), set(configs)
    for key, valid in (("methods", adapters), ("references", references)):
        values = spec.get(key) or []
        if isinstance(values, str) or not isinstance(values, Sequence):
            raise SweepError(f"sweep.{key} must be a list or {ALL}, "
                             f"e.g. sweep.{key}=[{','.join(valid[:2])}]; got {values!r}")
        for name in values:
            if name not in valid:
                raise SweepError(f"unknown method {name!r} in sweep.{key}; valid: {', '.join(valid)}")
            if name not in configs:
                raise SweepError(f"method {name!r} in sweep.{key} has no conf/method/{name}.yaml")
    for name in (spec.get("hp") or {}):
        if name not in adapters and name not in references:
            raise SweepError(f"unknown method {name!r} in sweep.hp; "
                             f"valid: {', '.join(adapters + references)}")
    validate_factors(spec)
    if not expand(spec):
        raise SweepError("the sweep is empty: sweep.methods and sweep.references are both empty")


def registered_methods() -> tuple[list[str], list[str]]:
    """(adapter methods of the registry, reference points) — what sweep.methods / sweep.references accept."""
    import methods
    from runners.engine.adapt import REFERENCES

    return sorted(methods.available()), sorted(REFERENCES)


ALL = "all"  # sweep.methods / sweep.references: every registered adapter / every reference point


def resolve_methods(spec: Mapping[str, Any], adapters: Sequence[str],
                    references: Sequence[str]) -> dict[str, Any]:
    """The spec with `all` in sweep.methods / sweep.references replaced by every registered name, so a
    new method joins every sweep by registering itself."""
    out = dict(spec)
    for key, names in (("methods", adapters), ("references", references)):
        if out.get(key) == ALL:
            out[key] = sorted(names)
    return out


def factor_axes(spec: Mapping[str, Any], defaults: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """sweep.hp with `sweep.hp_factors` ({hp: [factors]}) turned into each method's own axis: the factors
    times the method's default of that hp (`defaults`: method -> {hp: default}; an int default gives int
    values, at least 1). Methods without that hp get no axis; an explicit sweep.hp.<method>.<hp> wins."""
    hp = {m: dict(axes) for m, axes in (spec.get("hp") or {}).items()}
    for key, factors in (spec.get("hp_factors") or {}).items():
        for method, own in defaults.items():
            if own.get(key) is not None and key not in hp.get(method, {}):
                hp.setdefault(method, {})[key] = _scaled(own[key], factors)
    return hp


def _scaled(default: float, factors: Sequence[float]) -> list[float | int]:
    if isinstance(default, int) and not isinstance(default, bool):
        return sorted({max(1, round(default * f)) for f in factors})
    return sorted({float(f"{float(default) * float(f):.6g}") for f in factors})   # 6 digits: clean run names


def validate_factors(spec: Mapping[str, Any]) -> None:
    """sweep.hp_factors must map hyper-parameter names to non-empty lists of positive numbers."""
    factors = spec.get("hp_factors") or {}
    for key, values in (factors.items() if isinstance(factors, Mapping) else [("?", factors)]):
        ok = isinstance(values, Sequence) and not isinstance(values, str) and values and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values)
        if not ok:
            raise SweepError(f"sweep.hp_factors.{key} must be a list of positive numbers (multiples of each "
                             f"method's default {key}), e.g. [0.5,1,2]; got {values!r}")


# --- +sweep=paper (pure) ----------------------------------------------------------------------------

GRID_KEYS = ("methods", "hp", "seeds", "references")


def select_grid(spec: Mapping[str, Any], task: str, size: str) -> dict[str, Any]:
    """The spec with its `grids.<task>.<size>` filling the axes left null (+sweep=paper: each task's
    published comparison); a SweepError naming the task/size pairs that have one otherwise."""
    grids = spec.get("grids")
    if not grids:
        return dict(spec)
    grid = (grids.get(task) or {}).get(size)
    if grid is None:
        have = ", ".join(f"task={t} size={z}" for t, sizes in grids.items() for z in sizes)
        raise SweepError(f"+sweep={spec.get('name')} has no published comparison for task={task} "
                         f"size={size}; it has: {have}")
    out = {k: v for k, v in spec.items() if k != "grids"}
    return {**out, **{k: grid.get(k) for k in GRID_KEYS if out.get(k) is None}}


# --- +sweep=tuned (pure) -----------------------------------------------------------------------------

TUNED_METRIC = "accuracy"    # results' metrics.accuracy: each dataset's primary metric (CoLA: Matthews corr.)
TIE_BREAK = "loss"           # per_dataset_metrics.<dataset>.loss, the eval split's loss:
                             # lower wins a tied score


@dataclass(frozen=True)
class TuneGroup:
    """One (dataset, method, budget) of a tuned sweep and its stage-1 runs: (lr, job) per candidate
    (empty for sweep.untuned methods, which run at their default lr)."""

    method: str
    budget: Any
    dataset: str | None
    candidates: tuple[tuple[float, Job], ...]

    @property
    def label(self) -> str:
        return "/".join(str(x) for x in (self.dataset, self.method, self.budget) if x is not None)


def candidate_lrs(default: float, factors: Sequence[float]) -> list[float]:
    """sweep.lr_factors x the method's default lr, rounded to 6 significant digits (clean run names),
    sorted."""
    return sorted({float(f"{float(default) * float(f):.6g}") for f in factors})


def tuned_groups(spec: Mapping[str, Any], default_lrs: Mapping[str, float]) -> list[TuneGroup]:
    """Stage 1 of +sweep=tuned: per dataset x (methods x budgets + references), a validation run at the
    first seed per lr candidate, named `[<dataset>/]<method>[-<budget>]-lr<lr>-s<seed>-val`."""
    seed = (spec.get("seeds") or [0])[0]
    untuned = set(spec.get("untuned") or [])
    axes = _adapter_axes(spec) + [(r, None) for r in spec.get("references") or []]
    groups = []
    for dataset in spec.get("datasets") or [None]:
        for method, budget in axes:
            lrs = [] if method in untuned else candidate_lrs(default_lrs[method], spec["lr_factors"])
            jobs = tuple((lr, _validation_job(method, budget, seed, lr, dataset)) for lr in lrs)
            groups.append(TuneGroup(method, budget, dataset, jobs))
    return groups


def _validation_job(method: str, budget: Any, seed: int, lr: float, dataset: str | None) -> Job:
    job = _job(method, budget, seed, (("lr", lr),), dataset)
    return Job(f"{job.name}-val", (*job.overrides, "task.data.eval_split=validation"))


def final_jobs(group: TuneGroup, seeds: Sequence[int], lr: float | None) -> list[Job]:
    """Stage 2: the group at every seed, at `lr` (None: the default), scored on test; named like
    +sweep=budget's runs, `[<dataset>/]<method>[-<budget>]-s<seed>`."""
    extra = (f"++method.lr={lr}",) if lr is not None else ()
    jobs = [_job(group.method, group.budget, seed, (), group.dataset) for seed in seeds]
    return [Job(job.name, job.overrides + extra + ("task.data.eval_split=test",)) for job in jobs]


Score = tuple[float, float | None]  # (validation score, validation loss or None where not recorded)


def candidate_score(run_dir: Path) -> Score | None:
    """A stage-1 run's validation (score, loss): metrics.accuracy, and the mean over its datasets of the
    `TIE_BREAK` loss (None where the task records none). None when the run failed, is missing, its score is
    not finite or was scored on another split than validation (a test score never chooses anything)."""
    record = read_results(run_dir) or {}
    metrics = record.get("metrics") or {}
    value = metrics.get(TUNED_METRIC)
    ok = record.get("run", {}).get("status") == "success" and metrics.get("eval_split") == "validation"
    if not (ok and isinstance(value, (int, float)) and math.isfinite(value)):
        return None
    losses = [m.get(TIE_BREAK) for m in (metrics.get("per_dataset_metrics") or {}).values()]
    finite = losses and all(isinstance(x, (int, float)) and math.isfinite(x) for x in losses)
    return float(value), sum(losses) / len(losses) if finite else None


def choose_lr(scores: Sequence[tuple[float, Score | None]]) -> float | None:
    """The winning lr: highest validation score; among equal scores (a saturated validation split scores
    100% for several lrs) the lowest validation loss when every tied candidate recorded one, else the
    smaller lr; a failed candidate (None) never wins; None when all failed."""
    done = [(lr, score) for lr, score in scores if score is not None]
    if not done:
        return None
    best = max(score for _, (score, _) in done)
    tied = [(lr, loss) for lr, (score, loss) in done if score == best]
    if all(loss is not None for _, loss in tied):
        return min(tied, key=lambda c: (c[1], c[0]))[0]
    return min(lr for lr, _ in tied)


def tuning_record(chosen: float, candidates: Sequence[tuple[float, Score | None, str]]) -> dict[str, Any]:
    """What a final records as run.tuning: the metric, tie-break and split it was chosen on, the lr, every
    candidate."""
    return {"metric": TUNED_METRIC, "tie_break": TIE_BREAK, "split": "validation", "chosen_lr": chosen,
            "candidates": [{"lr": lr, "score": None if s is None else s[0],
                            "loss": None if s is None else s[1], "run_dir": run_dir}
                           for lr, s, run_dir in candidates]}


# --- what already ran --------------------------------------------------------------------------------

def config_diff(stored: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "",
                overridden: Collection[str] = ()) -> list[str]:
    """Dotted keys whose values differ between two resolved configs (ignoring logging/launch-only keys).

    A key the stored config lacks was declared after that run was made; a new key's declared default keeps
    the behaviour from before it was declared (tests/tasks/test_task_defaults.py checks the task defaults),
    so it counts as a difference only when this job overrides it or a key below it."""
    diffs = []
    for key in sorted(set(stored) | set(current)):
        path = f"{prefix}{key}"
        if not prefix and key in IGNORED_IN_DIFF:
            continue
        if key not in stored and not _overrides_touch(path, overridden):
            continue
        a, b = stored.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diffs += config_diff(a, b, f"{path}.", overridden)
        elif a != b:
            diffs.append(f"{path}: {a!r} -> {b!r}")
    return diffs


def _overrides_touch(path: str, overridden: Collection[str]) -> bool:
    """Whether an override sets `path` or a key below it; a group choice (`task=clip`) sets no key itself."""
    return any(k == path or k.startswith(f"{path}.") for k in overridden)


def override_keys(overrides: Collection[str]) -> list[str]:
    """The dotted keys of Hydra override strings (`+a.b=1`, `~a`, `a=1`), group selections included."""
    return [_key(o).split("@", 1)[0] for o in overrides]


def job_config(cfg: DictConfig) -> dict[str, Any] | None:
    """The resolved config the runner will record (hydra node removed), JSON-normalised; None if
    unresolvable."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    try:
        return json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True), default=str))
    except Exception:  # an interpolation only the job can resolve: compare nothing
        return None


def already_done(run_dir: Path, config: dict[str, Any] | None, overridden: Collection[str] = ()) -> bool:
    """True when run_dir holds a successful result of this very config; SweepError if of another one.
    `overridden`: the dotted keys this job's overrides set (see config_diff)."""
    if not is_complete(run_dir):
        return False
    stored = (read_results(run_dir) or {}).get("run", {}).get("config")
    diff = [] if stored is None or config is None else config_diff(stored, config, overridden=overridden)
    if diff:
        raise SweepError(f"{run_dir} holds a finished run of a different config ({'; '.join(diff[:3])}); "
                         "use another sweep.root (or hydra.sweep.dir), or delete that run")
    return True


# --- the Hydra sweeper -----------------------------------------------------------------------------

class RankbenchSweeper(BasicSweeper):
    """BasicSweeper that expands the `sweep` node, names job dirs deterministically and skips finished
    jobs."""

    def __init__(self, max_batch_size: int | None = None, mixed_gpu_types: bool = False,
                 params: dict[str, str] | None = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.mixed_gpu_types = mixed_gpu_types

    def sweep(self, arguments: list[str]) -> Any:
        try:
            return self._sweep(arguments)
        except SweepError as err:
            sys.exit(f"rankbench: {err}")  # one line, like run.py's command-line checks

    def _sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        spec = OmegaConf.to_container(self.config.get("sweep") or {}, resolve=True)
        if not spec:
            return super().sweep(arguments)
        spec = select_grid(spec, str(self.config.task.name), str(self.config.size.name))
        spec["datasets"] = sweep_datasets(self.config)
        base_jobs = [[o for o in base if _key(o) != "dataset"] for base in self._base_jobs(arguments)]
        _check_axes_not_overridden(base_jobs[0], spec.get("name", "?"))
        self._validate(spec)
        spec["unreachable"] = unreachable_pairs(self.config, spec)
        if spec.get("lr_factors"):  # +sweep=tuned: lr chosen on validation, then the winner on test
            return self._sweep_tuned(spec, base_jobs)
        jobs = [Job(_with_suffix(job.name, base, base_jobs), tuple(base) + job.overrides)
                for base in base_jobs for job in expand(spec)]
        todo = self._within_memory(spec, self._pending(jobs))
        if spec.get("dry_run"):
            for job, run_dir in todo:
                log.info("would launch %s -> %s", job.name, run_dir)
            log.info("sweep %s: dry run, %d of %d runs would launch", spec.get("name"), len(todo), len(jobs))
            return []
        self._check_before_submitting(spec)
        self._save_multirun_yaml()
        if not todo:
            log.info("sweep %s: all %d runs already finished; nothing to launch", spec.get("name"), len(jobs))
            return []
        log.info("sweep %s: %d runs, %d finished, launching %d", spec.get("name"), len(jobs),
                 len(jobs) - len(todo), len(todo))
        return self._launch([[*job.overrides, f"hydra.sweep.subdir={job.name}"] for job, _ in todo])

    # --- +sweep=tuned: two stages ---------------------------------------------------------------------

    def _sweep_tuned(self, spec: dict[str, Any], base_jobs: list[list[str]]) -> Any:
        """Stage 1: every lr candidate at the first seed, scored on validation; stage 2 (after stage 1's
        jobs returned): each group's winner at every seed, scored on test. Finished runs are skipped in
        both."""
        units = [(base, group) for base in base_jobs
                 for group in tuned_groups(spec, self._default_lrs(spec, base))]
        stage1 = [self._based(job, base, base_jobs) for base, group in units for _, job in group.candidates]
        todo = self._within_memory(spec, self._pending(stage1))
        if spec.get("dry_run"):
            return self._dry_run_tuned(spec, units, base_jobs, todo, len(stage1))
        self._check_before_submitting(spec)
        self._save_multirun_yaml()
        log.info("sweep %s, stage 1 (lr on validation): %d runs, %d finished, launching %d", spec.get("name"),
                 len(stage1), len(stage1) - len(todo), len(todo))
        if todo:
            self._launch([[*job.overrides, f"hydra.sweep.subdir={job.name}"] for job, _ in todo])
        finals = [job for base, group in units for job in self._finals(spec, base, group, base_jobs)]
        todo = self._pending([job for job, _ in finals])
        tuning = dict(finals)
        for job, run_dir in todo:  # the runner copies it into results.json as run.tuning
            if tuning[job] is not None:
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / TUNING_FILE).write_text(json.dumps(tuning[job], indent=2) + "\n")
        log.info("sweep %s, stage 2 (winners on test): %d runs, %d finished, launching %d", spec.get("name"),
                 len(finals), len(finals) - len(todo), len(todo))
        if not todo:
            return []
        return self._launch([[*job.overrides, f"hydra.sweep.subdir={job.name}"] for job, _ in todo])

    def _finals(self, spec: dict[str, Any], base: list[str], group: TuneGroup, base_jobs: list[list[str]]
                ) -> list[tuple[Job, dict[str, Any] | None]]:
        """(final job, its tuning record) at every seed, at the group's validation winner; none (and one
        log line) when every candidate failed."""
        seeds = list(spec.get("seeds") or [0])
        if not group.candidates:  # sweep.untuned: run at the default lr, no tuning record
            return [(self._based(job, base, base_jobs), None) for job in final_jobs(group, seeds, None)]
        scored = [(lr, self._run_dir(self._based(job, base, base_jobs))) for lr, job in group.candidates]
        scores = [(lr, candidate_score(run_dir)) for lr, run_dir in scored]
        chosen = choose_lr(scores)
        if chosen is None:
            log.error("sweep %s: no final for %s: all %d lr candidates failed (see %s)", spec.get("name"),
                      group.label, len(scores), scored[0][1].parent)
            return []
        record = tuning_record(chosen, [(lr, score, str(run_dir))
                                        for (lr, score), (_, run_dir) in zip(scores, scored, strict=True)])
        log.info("sweep %s: %s lr %g chosen on validation (%s)", spec.get("name"), group.label, chosen,
                 ", ".join(f"{lr:g}: {_score_text(s)}" for lr, s in scores))
        return [(self._based(job, base, base_jobs), record) for job in final_jobs(group, seeds, chosen)]

    def _dry_run_tuned(self, spec: dict[str, Any], units: list[tuple[list[str], TuneGroup]],
                       base_jobs: list[list[str]], todo: list[tuple[Job, Path]], n_stage1: int) -> list[Any]:
        """List stage 1's pending runs, then every final (its lr is known only once stage 1 has run)."""
        for job, run_dir in todo:
            log.info("would launch (stage 1, validation) %s -> %s", job.name, run_dir)
        finals = [self._based(job, base, base_jobs) for base, group in units
                  for job in final_jobs(group, list(spec.get("seeds") or [0]), None)]
        for job in finals:
            log.info("would launch (stage 2, test, at the validation winner's lr, or the default for "
                     "sweep.untuned) %s -> %s", job.name, self._run_dir(job))
        log.info("sweep %s: dry run, stage 1: %d of %d runs would launch; stage 2: up to %d finals",
                 spec.get("name"), len(todo), n_stage1, len(finals))
        return []

    def _default_lrs(self, spec: dict[str, Any], base: list[str]) -> dict[str, float]:
        """Each swept method's default lr on this task (runners.engine.optimizer.method_lr of its composed
        config)."""
        from runners.engine.optimizer import method_lr

        loader, out = self.hydra_context.config_loader, {}
        for method in [*(spec.get("methods") or []), *(spec.get("references") or [])]:
            out[method] = method_lr(loader.load_sweep_config(self.config, [*base, f"method={method}"]))
        return out

    @staticmethod
    def _based(job: Job, base: list[str], base_jobs: list[list[str]]) -> Job:
        return Job(_with_suffix(job.name, base, base_jobs), tuple(base) + job.overrides)

    def _run_dir(self, job: Job) -> Path:
        cfg = self.hydra_context.config_loader.load_sweep_config(
            self.config, [*job.overrides, f"hydra.sweep.subdir={job.name}"])
        return Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)

    def _base_jobs(self, arguments: list[str]) -> list[list[str]]:
        """Cartesian product of the command line's own sweeps (one empty-suffix job when there are none)."""
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides(self._parse_config() + list(arguments))
        return self.split_arguments(overrides, None)[0]

    def _validate(self, spec: dict[str, Any]) -> None:
        """Resolve `all` and sweep.hp_factors into the spec, in place (every later step reads it), and check
        it against the registry and conf/method/."""
        configs = self.hydra_context.config_loader.get_group_options("method")
        adapters, references = registered_methods()
        spec.update(resolve_methods(spec, adapters, references))
        validate(spec, adapters, references, configs)
        if spec.get("hp_factors"):
            spec["hp"] = factor_axes(spec, self._method_defaults(spec))

    def _method_defaults(self, spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Each swept method's default of every sweep.hp_factors key on this task: `lr` as the runner
        resolves it (runners.engine.optimizer.method_lr), other keys from its composed method config
        (absent: None, no axis)."""
        from runners.engine.optimizer import method_lr

        loader, out = self.hydra_context.config_loader, {}
        for method in [*(spec.get("methods") or []), *(spec.get("references") or [])]:
            cfg = loader.load_sweep_config(self.config, [f"method={method}"])
            out[method] = {key: method_lr(cfg) if key == "lr" else cfg.method.get(key)
                           for key in spec["hp_factors"]}
        return out

    def _pending(self, jobs: list[Job]) -> list[tuple[Job, Path]]:
        """(job, run dir) to launch: compose each (catching composition errors early), drop finished ones."""
        loader = self.hydra_context.config_loader
        todo = []
        for job in jobs:
            overrides = [*job.overrides, f"hydra.sweep.subdir={job.name}"]
            cfg = loader.load_sweep_config(self.config, overrides)
            run_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
            if already_done(run_dir, job_config(cfg), override_keys(cfg.hydra.overrides.task)):
                log.info("skip %s: %s/results.json says success", job.name, run_dir)
            else:
                todo.append((job, run_dir))
        return todo

    def _within_memory(self, spec: dict[str, Any], todo: list[tuple[Job, Path]]) -> list[tuple[Job, Path]]:
        """The jobs the memory plan lets through (runners/engine/memplan.py): one over the card stops the
        sweep before anything is submitted (`plan.over=refuse`) or is skipped with its line
        (`plan.over=skip`)."""
        from runners.engine.memplan import over_card

        loader = self.hydra_context.config_loader
        configs = [(job.name,
                    loader.load_sweep_config(self.config, [*job.overrides, f"hydra.sweep.subdir={job.name}"]))
                   for job, _ in todo]
        over = over_card(configs, self.config.plan, processes_per_job(self.config.hydra.launcher),
                         show=bool(spec.get("dry_run")))
        if over and str(self.config.plan.over) != "skip":
            raise SweepError(f"{len(over)} job(s) cannot fit the GPU, nothing submitted; first: {over[0]}. "
                             "To launch the others, set plan.over=skip")
        for line in over:
            log.warning("sweep %s: not launching %s", spec.get("name"), line)
        names = {line.split(":", 1)[0] for line in over}
        return [(job, run_dir) for job, run_dir in todo if job.name not in names]

    def _check_before_submitting(self, spec: dict[str, Any]) -> None:
        """On the submitting machine, before a job array is queued: the suite's data and model checked
        (runners/sweeps/presubmit.py), so a wrong column or a missing path never costs GPU time."""
        problems = launch_problems(self.config, spec)
        if problems:
            raise SweepError(f"preflight found {len(problems)} problem(s) before submitting: {problems[0]}"
                             + (f" (and {len(problems) - 1} more, listed above)" if len(problems) > 1 else "")
                             + "; fix them, or set sweep.preflight=false")
        problem = None if self.mixed_gpu_types else mixed_gpu_problem(self.config.hydra.launcher)
        if problem is not None:
            raise SweepError(problem)

    def _save_multirun_yaml(self) -> None:
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

    def _launch(self, job_overrides: list[list[str]]) -> list[Any]:
        _export_project_path()
        size = self.max_batch_size or (1 if _is_local(self.config) else len(job_overrides))
        returns, start = [], 0
        for batch in self.split_overrides_to_chunks(job_overrides, size):
            results = self.launcher.launch(batch, initial_job_idx=start)
            for r in results:
                _ = r.return_value  # re-raises a job's exception, as the basic sweeper does
            start += len(batch)
            returns.append(results)
        return returns


def _score_text(score: Score | None) -> str:
    if score is None:
        return "failed"
    return f"{score[0]:.4f}" + ("" if score[1] is None else f" (loss {score[1]:.4f})")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _check_axes_not_overridden(base: list[str], sweep_name: str) -> None:
    for override in base:
        key = _key(override)
        if key in AXIS_KEYS:
            raise SweepError(f"{key}= is set per run by +sweep={sweep_name}; narrow the sweep with "
                             f"sweep.methods=[...], sweep.budgets=[...] or sweep.seeds=[...] instead")


def _with_suffix(name: str, base: list[str], base_jobs: list[list[str]]) -> str:
    """Name + the command-line sweep values that vary between base jobs (so their dirs differ)."""
    varying = [o for o in base if sum(o in other for other in base_jobs) < len(base_jobs)]
    return ",".join([name] + [o.lstrip("+~").replace("/", "_") for o in varying])


def _export_project_path() -> None:
    """Let job processes (submitit local/SLURM) import this project even when it is not pip-installed."""
    root = str(Path(__file__).resolve().parents[2])
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])


def processes_per_job(launcher: DictConfig) -> int:
    """GPUs (processes) one job runs on: SLURM tasks per node x nodes; 1 for local launchers."""
    if not str(launcher.get("_target_", "")).endswith("SlurmLauncher"):
        return 1
    return int(launcher.get("tasks_per_node") or 1) * int(launcher.get("nodes") or 1)


def _is_local(config: DictConfig) -> bool:
    """Local launchers run on this machine's cores: one job at a time (2 cores thrash otherwise)."""
    target = str(config.hydra.launcher.get("_target_", ""))
    return target.endswith(("LocalLauncher", "BasicLauncher"))


# --- registration with Hydra -----------------------------------------------------------------------

def register() -> None:
    """Publish RankbenchSweeper as `hydra_plugins.rankbench_sweeper.RankbenchSweeper` (Hydra's plugin
    rule)."""
    from hydra.core.plugins import Plugins

    module = sys.modules.get(PLUGIN_MODULE)
    if module is None:
        import hydra_plugins

        module = types.ModuleType(PLUGIN_MODULE, "rankbench sweeper (defined in runners/sweeps/sweeper.py)")
        cls = type("RankbenchSweeper", (RankbenchSweeper,), {"__module__": PLUGIN_MODULE})
        module.RankbenchSweeper = cls
        sys.modules[PLUGIN_MODULE] = module
        hydra_plugins.rankbench_sweeper = module
    Plugins.instance().register(module.RankbenchSweeper)


class RegisterSweeper(Callback):
    """Hydra callback whose only job is `register()`: Hydra builds callbacks just before the sweeper."""

    def __init__(self) -> None:
        register()
