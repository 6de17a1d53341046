"""Multi-dataset suites, as the papers run them: one fresh adapter per dataset, then the mean.

RandLoRA (like aTLAS and task-vector work before it) fine-tunes a fresh copy of the pretrained model on
each dataset of a suite with that dataset's own epochs, and reports each dataset and their mean. A suite
run (`python run.py task=clip`, no `dataset=`) therefore runs one complete run per dataset in
`<run dir>/<dataset>/` (each with its own results.json, checkpoint and adapter, so an interrupted suite
resumes where it stopped) and writes the suite's summary record to `<run dir>/results.json`, whose
`run.parts` names the per-dataset files (runners/train.py runs the parts; this module says which datasets
and builds the summary). Sweeps expand over a suite's datasets instead (one job per dataset).
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

import tasks
from runners.record.results import FILENAME
from runners.record.schema import Metrics, Record, suite_cost, suite_forgetting

log = logging.getLogger(__name__)


def suite_datasets(task_cfg: DictConfig) -> list[str]:
    """The datasets a run of task config `task_cfg` trains one adapter for each: a suite's datasets when
    the task trains per dataset and no `dataset=` was given; else an empty list (one run covers
    everything)."""
    task = tasks.build(task_cfg)
    names = task.datasets
    return list(names) if task.trains_per_dataset and len(names) > 1 else []


def sweep_datasets(cfg: DictConfig) -> list[str]:
    """The datasets a sweep expands over (one job each): the suite, or the one `dataset=` names; none
    for a task that trains one adapter for all its evaluation sets."""
    task = tasks.build(cfg.task)
    return list(task.datasets) if task.trains_per_dataset else []


def dataset_config(cfg: DictConfig, dataset: str, run_dir: Path, group: str | None = None) -> DictConfig:
    """The config of one dataset's run of a suite: `dataset=<name>`, written under `run_dir/<name>`,
    logged in W&B group `group` (the suite's, runners.record.logger.suite_group) when one is given."""
    sub = cfg.copy()
    with open_dict(sub):
        sub.dataset = dataset
        sub.out_dir = str(run_dir / dataset)
        if group is not None:
            sub.logger.group = group
    return sub




def summary_record(record: dict[str, Any], names: list[str], records: dict[str, dict[str, Any]],
                   errors: dict[str, str]) -> dict[str, Any]:
    """The suite's record: each dataset's metrics and their mean; parameters of the (identical)
    per-dataset adapters; cost figures as the mean over datasets (train time summed, memory the max).
    Each part is read through runners.record.schema (a part finished by an older rankbench is upgraded)."""
    parts = {n: Record.from_dict(r) for n, r in records.items()}
    first = next(iter(parts.values()), None)
    run = record["run"]
    if first:
        for key in ("hp", "budget_target", "device", "gpu", "regime", "memory_savers", "model_revision",
                    "world_size"):
            run[key] = getattr(first.run, key)
        run["max_steps"] = {n: p.run.max_steps for n, p in parts.items()}
        run["dataset_revisions"] = {n: (p.run.dataset_revisions or {}).get(n) for n, p in parts.items()}
        record["params"] = asdict(first.params)
    run["parts"] = {n: f"{n}/{FILENAME}" for n in names}
    metrics = Metrics(per_dataset=_each(parts, "per_dataset"),
                      per_dataset_before=_each(parts, "per_dataset_before"),
                      per_dataset_metrics=_each(parts, "per_dataset_metrics"),
                      per_dataset_metrics_before=_each(parts, "per_dataset_metrics_before"),
                      eval_examples=_each(parts, "eval_examples"),
                      delta_rank={f"{n}/{layer}": v for n, p in parts.items()
                                  for layer, v in p.metrics.delta_rank.items()},
                      eval_split=first.metrics.eval_split if first else None,
                      **suite_forgetting({n: p.metrics for n, p in parts.items()}))
    cost = suite_cost([p.cost for p in parts.values()]).to_dict()
    record.update(metrics=asdict(metrics), cost=cost, history=[])
    run["suite_errors"] = errors
    return record


def _each(parts: dict[str, Record], key: str) -> dict[str, Any]:
    """Each part's own dataset's entry of `metrics.<key>`."""
    return {n: getattr(p.metrics, key)[n] for n, p in parts.items() if n in getattr(p.metrics, key)}
