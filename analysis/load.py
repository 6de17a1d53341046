"""Read `results.json` files (or a W&B project) into one tidy DataFrame: one row per run and dataset.

Every record is read through `runners.record.schema.Record` (schema-1 files are upgraded there, explicitly),
so a column is a field the runner wrote, never a guess from candidate keys. Everything downstream
(aggregation, plots, report) reads only this frame, so local files and W&B exports are
interchangeable. Corrupt or partial files are skipped with a warning naming the file and the reason
(a crashed sweep must still produce a report); failed runs are kept with `status == "failed"` so the
report can list them, and the aggregation functions leave them out.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import fields, replace
from pathlib import Path
from statistics import fmean as mean
from typing import Any

import pandas as pd

from runners.record.logger import SUITE_JOB_TYPE
from runners.record.schema import (
    Cost,
    Metrics,
    Params,
    Record,
    Run,
    cost_figures,
    suite_cost,
    suite_forgetting,
)

log = logging.getLogger(__name__)

RESULTS_FILENAME = "results.json"

#: results.json `cost` figures (runners.record.schema.Cost): GPU allocator figures on CUDA, RSS growth on CPU,
#: the device-independent activation and state bytes on every device.
COST_COLUMNS = [f.name for f in fields(Cost)]
#: Columns that identify one comparison panel (one figure): same task, backbone and data regime.
PANEL_KEYS = ["task", "size", "model", "regime"]
#: Columns that identify one configuration; rows that differ only in `seed` are repetitions.
SETTING_KEYS = [*PANEL_KEYS, "method", "budget_target", "setting", "lr"]

_RUN_COLUMNS = [
    "run_id", "method", "method_kind", "method_label", "task", "run_dataset", "size", "model", "regime",
    "seed", "budget_target", "setting", "lr", "hp", "status", "error", "device", "device_type", "world_size",
    "git_commit", "git_dirty", "versions", "command", "started_at", "finished_at", "source", "protocol",
    "model_revision", "dataset_revisions",
    "trainable_params", "head_trainable_params", "total_params", "budget_error", "budget_reached",
    "adapter_file_bytes", *COST_COLUMNS, "mean_accuracy", "mean_accuracy_before", "eval_split", "forgetting",
    "dw_rank", "dw_effective_rank", "dw_max_rank", "dw_rank_frac", "dw_effective_rank_frac", "delta_rank",
]
#: Per-dataset columns: the dataset's primary metric before/after and all its metrics (GLUE's own
#: metrics, e.g. Matthews correlation for CoLA) as JSON, and how many examples they were scored on.
_DATASET_COLUMNS = ["dataset", "accuracy", "accuracy_before", "dataset_metrics", "eval_examples"]
COLUMNS = [*_RUN_COLUMNS[:6], *_DATASET_COLUMNS, *_RUN_COLUMNS[6:]]
#: How the report names the runner's data regimes (tasks.regimes.regime_name: "16shot", "frac0.5", "full").
_REGIME_LABELS = {"full": "full data"}


class ResultsError(ValueError):
    """The inputs hold nothing to report on (missing directory, no result files, nothing readable)."""


class _Corrupt(ValueError):
    """A result file that cannot be used; the message says what is wrong with it."""


# ----------------------------------------------------------------------------------------- public


def find_result_files(paths: Iterable[str | Path]) -> list[Path]:
    """Every `results.json` under the given directories (recursively), or the files themselves, once each."""
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise ResultsError(f"{p}: no such file or directory")
        if p.is_file():
            files.append(p)
            continue
        found = sorted(p.rglob(RESULTS_FILENAME))
        if not found:
            raise ResultsError(f"{p}: no {RESULTS_FILENAME} found under this directory")
        files.extend(found)
    return list(dict.fromkeys(f.resolve() for f in files))  # a file named twice is read once


def load_results(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Tidy frame of every result file under `paths`; `df.attrs["skipped"]` lists unusable files."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    skipped: list[dict[str, str]] = []
    records: list[tuple[str, Record]] = []
    files = find_result_files(paths)
    for path in files:
        try:
            record = read_record(path)
        except _Corrupt as exc:
            log.warning("skipping %s: %s", path, exc)
            skipped.append({"file": str(path), "reason": str(exc)})
            continue
        if not _parts_loaded(record, path, files):
            records.append((str(path), record))
    rows = [row for source, record in combine_suites(records)
            for row in record_to_rows(record, source=source)]
    if not rows:
        raise ResultsError(f"no readable result files ({len(skipped)} skipped: {_first_reason(skipped)})")
    return _frame(rows, skipped)


def read_record(path: Path) -> Record:
    """One results.json through the schema; `_Corrupt` (one line) when it is not a usable record."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise _Corrupt(f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _Corrupt(f"unreadable ({exc})") from None
    return _checked(data)


def _checked(data: Any) -> Record:
    """A schema record that is complete: a success without metrics is a partial write, not a result."""
    try:
        record = data if isinstance(data, Record) else Record.from_dict(data)
    except ValueError as exc:
        raise _Corrupt(str(exc)) from None
    m = record.metrics
    if record.run.status == "success" and m.accuracy is None and not m.per_dataset:
        raise _Corrupt("status is success but metrics.accuracy is missing (partial file?)")
    return record


def _parts_loaded(record: Record, path: Path, files: list[Path]) -> bool:
    """A suite summary (`run.parts`) whose per-dataset files are loaded too: read those, not it."""
    parts = record.run.parts or {}
    return bool(parts) and all((path.parent / p).resolve() in files for p in parts.values())


def _suite_key(record: Record) -> str | None:
    """Identity of the suite run a per-dataset run belongs to: its config without the dataset, and without
    the lr where +sweep=tuned chose it on that dataset's validation split (`run.tuning`): choosing each
    dataset's lr is the protocol, so those runs form one suite run as the others do."""
    if not record.run.dataset or not record.run.config:
        return None
    config = {k: v for k, v in record.run.config.items()
              if k not in ("dataset", "out_dir", "logger", "sweep")}
    if isinstance(config.get("task"), dict):
        config["task"] = {k: v for k, v in config["task"].items() if k != "dataset"}
    if record.run.tuning is not None and isinstance(config.get("method"), dict):
        config["method"] = {k: v for k, v in config["method"].items() if k != "lr"}
    return json.dumps(config, sort_keys=True, default=str)


def combine_suites(records: list[tuple[str, Record]]) -> list[tuple[str, Record]]:
    """Per-dataset runs of one suite configuration (same config but `dataset`, e.g. the jobs of a sweep
    over a suite) -> one record per suite run: each dataset's metrics plus their mean, so the report
    compares suites as the papers do. Failed parts make the suite record failed; others pass through."""
    groups: dict[str, list[tuple[str, Record]]] = {}
    out = []
    for source, record in records:
        key = _suite_key(record)
        if key is None:
            out.append((source, record))
        else:
            groups.setdefault(key, []).append((source, record))
    for members in groups.values():
        out.append(members[0] if len(members) == 1 else _combined(members))
    return out


def _combined(members: list[tuple[str, Record]]) -> tuple[str, Record]:
    """The suite record of per-dataset runs, by the rules of the runner's own suite summary
    (runners.engine.suite.summary_record): metrics per dataset and their mean, costs by `suite_cost`."""
    records = [r for _, r in sorted(members, key=lambda m: m[1].run.dataset)]
    first = records[0].run
    failed = [r.run for r in records if r.run.status != "success"]
    run = replace(first, dataset=None, parts={r.run.dataset: s for s, r in members},
                  dataset_revisions={r.run.dataset: (r.run.dataset_revisions or {}).get(r.run.dataset)
                                     for r in records})
    if len({r.run.lr for r in records}) > 1:  # tuned per dataset: no one lr; each part's record has its own
        run = replace(run, lr=None, tuning=None)
    if failed:
        run = replace(run, status="failed", error="; ".join(f"{r.dataset}: {r.error}" for r in failed))
    merged = {key: {d: v for r in records for d, v in getattr(r.metrics, key).items()}
              for key in ("per_dataset", "per_dataset_before", "per_dataset_metrics",
                          "per_dataset_metrics_before", "eval_examples")}
    after, before = merged["per_dataset"], merged["per_dataset_before"]
    metrics = Metrics(**merged, eval_split=records[0].metrics.eval_split,
                      **suite_forgetting({r.run.dataset: r.metrics for r in records}),
                      accuracy=mean(after.values()) if after else None,
                      accuracy_before=mean(before.values()) if before else None,
                      delta_rank={f"{r.run.dataset}/{k}": v for r in records
                                  for k, v in r.metrics.delta_rank.items()})
    source = "suite:" + ",".join(s for s, _ in sorted(members))
    return source, replace(records[0], run=run, metrics=metrics, cost=suite_cost([r.cost for r in records]))


def load_wandb(path: str, api: Any | None = None) -> pd.DataFrame:
    """Tidy frame from a W&B project (`entity/project`) via the public API, same columns as files. A
    suite's summary run (job type `suite`, runners.record.logger.log_suite) is left out: its datasets are
    loaded from their own runs, as a suite's results.json is when its parts are.

    `api` defaults to `wandb.Api()`; tests pass a stand-in with a `runs(path)` method.
    """
    if api is None:
        import wandb

        api = wandb.Api()
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for run in api.runs(path):
        source = f"wandb:{path}/{getattr(run, 'id', '?')}"
        if getattr(run, "job_type", None) == SUITE_JOB_TYPE:  # the parts are runs of their own
            continue
        try:
            rows.extend(record_to_rows(wandb_run_to_record(run), source=source))
        except _Corrupt as exc:
            log.warning("skipping %s: %s", source, exc)
            skipped.append({"file": source, "reason": str(exc)})
    if not rows:
        raise ResultsError(f"W&B project {path}: no usable runs")
    return _frame(rows, skipped)


def record_to_rows(record: Record | dict[str, Any], source: str = "") -> list[dict[str, Any]]:
    """One record (a Record or a parsed results.json) -> one row per evaluated dataset (one row for a
    failed run)."""
    record = _checked(record)
    base = {**_run_fields(record.run, source), **_param_fields(record.params), **cost_figures(record.cost),
            **_metric_fields(record.metrics), **_rank_fields(record.metrics.delta_rank)}
    return [{**base, **ds} for ds in _dataset_rows(record.metrics, record.run)]


def wandb_run_to_record(run: Any) -> dict[str, Any]:
    """Map a W&B run (config = resolved Hydra config, summary = params/cost/metrics) to a schema-1
    record (`Record.from_dict` upgrades it: lr, regime and model from the config)."""
    config = _plain(getattr(run, "config", {}) or {})
    summary = _unflatten(_plain(getattr(run, "summary", {}) or {}))
    method_cfg = config.get("method") if isinstance(config.get("method"), dict) else {}
    info = dict(summary.get("run") or {})
    state = getattr(run, "state", "finished")
    info.setdefault("id", getattr(run, "id", None))
    info.setdefault("method", method_cfg.get("name"))
    info.setdefault("task", _cfg_name(config.get("task")))
    info.setdefault("dataset", config.get("dataset"))
    info.setdefault("size", _cfg_name(config.get("size")))
    info.setdefault("seed", config.get("seed"))
    info.setdefault("budget_target", _wandb_budget(summary, config))
    info.setdefault("hp", {k: v for k, v in method_cfg.items() if k != "name"})
    info.setdefault("config", config)
    info.setdefault("status", "success" if state == "finished" else "failed")
    info.setdefault("error", None if state == "finished" else f"W&B run state: {state}")
    info.setdefault("started_at", getattr(run, "created_at", None))
    for key in ("git_commit", "versions", "device", "gpu"):
        if (value := summary.get(key) or config.get(key)) is not None:
            info.setdefault(key, value)
    return {"schema": 1, "run": info, "params": summary.get("params") or {},
            "cost": summary.get("cost") or {}, "metrics": summary.get("metrics") or {}}


# ------------------------------------------------------------------------------------ sections


def _run_fields(run: Run, source: str) -> dict[str, Any]:
    return {
        "run_id": run.id, "method": run.method, "method_kind": run.method_kind,
        "method_label": run.method_label, "task": run.task or "?", "run_dataset": run.dataset,
        "size": run.size or "?", "model": _model_name(run.model),
        "regime": _regime_label(run.regime), "seed": run.seed, "budget_target": run.budget_target,
        "setting": _setting(run.budget_target, run.hp), "lr": run.lr,
        "hp": json.dumps(run.hp, sort_keys=True, default=str), "status": run.status, "error": run.error,
        "device": run.device, "device_type": _device_type(run), "world_size": run.world_size,
        "git_commit": run.git_commit, "git_dirty": run.git_dirty,
        "versions": json.dumps(run.versions, sort_keys=True),
        "command": run.command or _rebuilt_command(run), "started_at": run.started_at,
        "finished_at": run.finished_at, "source": source,
        "protocol": json.dumps(run.protocol or {}, sort_keys=True),
        "model_revision": run.model_revision,
        "dataset_revisions": (json.dumps(run.dataset_revisions, sort_keys=True)
                              if run.dataset_revisions else None),
    }


def _param_fields(params: Params) -> dict[str, Any]:
    return {"trainable_params": params.trainable, "head_trainable_params": params.head_trainable,
            "total_params": params.total, "budget_error": params.budget_error,
            "budget_reached": params.budget_reached, "adapter_file_bytes": params.adapter_file_bytes}


def _device_type(run: Run) -> str | None:
    """"cpu" or the GPU model (`run.gpu.name`; older files: the name in `run.device`, "cuda:<name>"):
    step time and memory are comparable only between runs on the same kind of device."""
    if run.gpu and run.gpu.get("name"):
        return str(run.gpu["name"])
    kind, _, name = str(run.device or "").partition(":")
    if kind == "cuda":
        return name or "cuda"
    return kind or None


def _metric_fields(metrics: Metrics) -> dict[str, Any]:
    forgetting = metrics.forgetting if isinstance(metrics.forgetting, (int, float)) else None
    return {"mean_accuracy": metrics.accuracy, "mean_accuracy_before": metrics.accuracy_before,
            "eval_split": metrics.eval_split, "forgetting": forgetting}


def _rank_fields(delta_rank: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean over the sampled layers; rank fractions make layers of different shapes comparable."""
    out = dict.fromkeys(["dw_rank", "dw_effective_rank", "dw_max_rank", "dw_rank_frac",
                         "dw_effective_rank_frac"], math.nan)
    out["delta_rank"] = None
    layers = [v for v in delta_rank.values() if isinstance(v, dict) and v.get("max_rank")]
    if not layers:
        return out
    out.update(
        dw_rank=mean([float(v.get("rank", math.nan)) for v in layers]),
        dw_effective_rank=mean([float(v.get("effective_rank", math.nan)) for v in layers]),
        dw_max_rank=mean([float(v["max_rank"]) for v in layers]),
        dw_rank_frac=mean([float(v.get("rank", math.nan)) / v["max_rank"] for v in layers]),
        dw_effective_rank_frac=mean([float(v.get("effective_rank", math.nan)) / v["max_rank"]
                                     for v in layers]),
        delta_rank=json.dumps(delta_rank, sort_keys=True),
    )
    return out


def _dataset_rows(metrics: Metrics, run: Run) -> list[dict[str, Any]]:
    """One row per dataset of `metrics.per_dataset`; a run without them (failed) gets one row."""
    if not metrics.per_dataset:
        return [{"dataset": run.dataset or run.task or "?", "accuracy": metrics.accuracy,
                 "accuracy_before": metrics.accuracy_before, "dataset_metrics": None, "eval_examples": None}]
    return [{"dataset": name, "accuracy": acc, "accuracy_before": metrics.per_dataset_before.get(name),
             "dataset_metrics": _json_or_none(metrics.per_dataset_metrics.get(name)),
             "eval_examples": metrics.eval_examples.get(name)}
            for name, acc in metrics.per_dataset.items()]


# ------------------------------------------------------------------------------------- helpers


def _frame(rows: list[dict[str, Any]], skipped: list[dict[str, str]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("budget_target", "seed", "trainable_params", "head_trainable_params", "total_params",
                "world_size"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    numeric = ["accuracy", "accuracy_before", "mean_accuracy", "mean_accuracy_before", "lr", "budget_error",
               "adapter_file_bytes", "forgetting", *COST_COLUMNS]
    df[numeric] = df[numeric].apply(pd.to_numeric, errors="coerce")
    df.attrs["skipped"] = skipped
    n_failed = df.loc[df.status != "success", "source"].nunique()
    log.info("loaded %d runs (%d failed), skipped %d files", df["source"].nunique(), n_failed, len(skipped))
    return df


def _first_reason(skipped: list[dict[str, str]]) -> str:
    return f"{skipped[0]['file']}: {skipped[0]['reason']}" if skipped else "none"


def _json_or_none(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True)


def _as_int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _cfg_name(node: Any) -> str | None:
    if isinstance(node, dict):
        return node.get("name") or node.get("kind")
    return node if isinstance(node, str) else None


def _model_name(model: str | None) -> str:
    """What panels call the backbone: the last part of `run.model` (hub id or folder), '?' if unrecorded."""
    return model.rstrip("/").split("/")[-1] if model else "?"


def _regime_label(regime: str | None) -> str:
    """`run.regime` as the report names it: '16-shot', '50% data', 'full data'; '?' if unrecorded."""
    if regime is None:
        return "?"
    if regime.endswith("shot") and regime[:-4].isdigit():
        return f"{regime[:-4]}-shot"
    if regime.startswith("frac"):
        return f"{float(regime[4:]) * 100:g}% data"
    return _REGIME_LABELS.get(regime, regime)


def _setting(budget: int | None, hp: dict) -> str:
    """Seeds of one configuration share this key: the budget, or the hyper-parameters without seeds."""
    if budget is not None:
        return f"budget={budget}"
    return json.dumps({k: v for k, v in hp.items() if k != "seed"}, sort_keys=True, default=str)


def _rebuilt_command(run: Run) -> str:
    """The command line of a run that did not record one (outside Hydra, older files), from its fields."""
    parts = [f"method={run.method}", f"task={run.task}", f"size={run.size}", f"seed={run.seed}"]
    if run.budget_target is not None:
        parts.append(f"budget={run.budget_target}")
    if run.dataset:
        parts.append(f"dataset={run.dataset}")
    return "python run.py " + " ".join(parts)


def _plain(obj: Any) -> Any:
    """W&B config/summary objects -> plain dicts (they are Mapping-like, not dicts)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """`{"cost/step_time_s": x}` -> `{"cost": {"step_time_s": x}}`; already nested dicts pass through.

    Only "/" separates levels (dataset and layer names contain dots, hub ids contain one "/").
    """
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if key.startswith("_"):
            continue  # W&B internals (_step, _runtime, _wandb)
        path = _key_path(key)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        leaf = node.get(path[-1])
        node[path[-1]] = {**leaf, **value} if isinstance(leaf, dict) and isinstance(value, dict) else value
    return out


def _key_path(key: str) -> list[str]:
    head, _, rest = key.partition("/")
    if not rest:
        return [key]
    if head != "metrics":
        return [head, rest]
    sub, _, name = rest.partition("/")
    if not name:
        return [head, sub]
    if sub == "delta_rank" and "/" in name:
        return [head, sub, *name.rsplit("/", 1)]
    return [head, sub, name]


def _wandb_budget(summary: dict, config: dict) -> int | None:
    params = summary.get("params") or {}
    for value in (params.get("budget_target"), summary.get("budget_target"), config.get("budget")):
        if _as_int(value) is not None:
            return _as_int(value)
    return None
