"""Multi-dataset suites, as the papers run them: one fresh adapter per dataset, then the mean.

RandLoRA (like aTLAS and task-vector work before it) fine-tunes a fresh copy of the pretrained model on
each dataset of a suite with that dataset's own epochs, and reports each dataset and their mean. A suite
run (`python run.py task=clip`, no `dataset=`) therefore runs one complete run per dataset in
`<run dir>/<dataset>/` (each with its own results.json, checkpoint and adapter, so an interrupted suite
resumes where it stopped) and writes the suite's summary record to `<run dir>/results.json`, whose
`run.parts` names the per-dataset files. Sweeps expand over a suite's datasets instead (one job per
dataset), so this module is only the single-command path.
"""
from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

import tasks
from runners.results import FILENAME

log = logging.getLogger(__name__)


def suite_datasets(cfg: DictConfig) -> list[str]:
    """The datasets a run trains one adapter for each: a suite's datasets when the task trains per
    dataset and no `dataset=` was given; else an empty list (one run covers everything)."""
    task = tasks.build(cfg.task)
    names = task.datasets
    return list(names) if task.trains_per_dataset and len(names) > 1 else []


def sweep_datasets(cfg: DictConfig) -> list[str]:
    """The datasets a sweep expands over (one job each): the suite, or the one `dataset=` names; none
    for a task that trains one adapter for all its evaluation sets."""
    task = tasks.build(cfg.task)
    return list(task.datasets) if task.trains_per_dataset else []


def dataset_config(cfg: DictConfig, dataset: str, run_dir: Path) -> DictConfig:
    """The config of one dataset's run of a suite: `dataset=<name>`, written under `run_dir/<name>`."""
    sub = cfg.copy()
    with open_dict(sub):
        sub.dataset = dataset
        sub.out_dir = str(run_dir / dataset)
    return sub


def run_suite(cfg: DictConfig, names: list[str], run_dir: Path, record: dict[str, Any],
              run_one: Callable[[DictConfig], dict[str, Any]], failed: type[Exception]) -> dict[str, Any]:
    """Run every dataset of the suite (finished ones are skipped), then fill the suite's `record`.

    A failing dataset does not stop the others; the summary then says which failed and why."""
    records, errors = {}, {}
    for i, name in enumerate(names, 1):
        log.info("suite %s: dataset %d of %d: %s", cfg.task.name, i, len(names), name)
        try:
            records[name] = run_one(dataset_config(cfg, name, run_dir))
        except failed as err:  # the dataset's own results.json holds the details
            cause = err.__cause__ or err
            errors[name] = f"{type(cause).__name__}: {cause}"
    return summary_record(record, names, records, errors)


def summary_record(record: dict[str, Any], names: list[str], records: dict[str, dict[str, Any]],
                   errors: dict[str, str]) -> dict[str, Any]:
    """The suite's record: each dataset's metrics and their mean; parameters of the (identical)
    per-dataset adapters; cost figures as the mean over datasets (train time summed, memory the max)."""
    first = next(iter(records.values()), None)
    if first:
        for key in ("hp", "budget_target", "device", "gpu", "max_steps", "regime", "memory_savers"):
            record["run"][key] = first["run"].get(key)
        record["run"]["max_steps"] = {n: r["run"].get("max_steps") for n, r in records.items()}
        record["params"] = dict(first["params"])
    record["run"]["parts"] = {n: f"{n}/{FILENAME}" for n in names}
    metrics = {key: {n: r["metrics"][key][n] for n, r in records.items() if n in r["metrics"].get(key, {})}
               for key in ("per_dataset", "per_dataset_before", "per_dataset_metrics",
                           "per_dataset_metrics_before")}
    metrics["delta_rank"] = {f"{n}/{layer}": v for n, r in records.items()
                             for layer, v in (r["metrics"].get("delta_rank") or {}).items()}
    record.update(metrics=metrics, cost=_suite_cost(records), history=[])
    record["run"]["suite_errors"] = errors
    return record


def _suite_cost(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    costs = [r["cost"] for r in records.values()]
    out: dict[str, Any] = {}
    for key in sorted({k for c in costs for k in c}):
        values = [c[key] for c in costs if isinstance(c.get(key), (int, float))]
        if not values:
            out[key] = None
        elif key == "train_time_s":
            out[key] = sum(values)
        elif key.startswith("peak") or key.endswith("_bytes"):
            out[key] = max(values)
        else:
            out[key] = statistics.fmean(values)
    return out
