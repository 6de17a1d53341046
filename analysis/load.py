"""Read `results.json` files (or a W&B project) into one tidy DataFrame: one row per run and dataset.

Everything downstream (aggregation, plots, report) reads only this frame, so local files and W&B
exports are interchangeable. Corrupt or partial files are skipped with a warning naming the file
(a crashed sweep must still produce a report); failed runs are kept with `status == "failed"` so the
report can list them, and the aggregation functions leave them out.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from statistics import fmean as mean
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)

RESULTS_FILENAME = "results.json"

#: results.json `cost` figures (runners.metrics): GPU allocator figures on CUDA, RSS growth on CPU, and
#: the device-independent activation and state bytes on every device.
COST_COLUMNS = ["step_time_s", "step_time_p90_s", "samples_per_s", "peak_mem_growth_bytes", "peak_mem_bytes",
                "peak_reserved_bytes", "peak_rss_bytes", "activation_bytes", "state_bytes", "train_time_s"]
#: Columns that identify one comparison panel (one figure): same task, backbone and data regime.
PANEL_KEYS = ["task", "size", "model", "regime"]
#: Columns that identify one configuration; rows that differ only in `seed` are repetitions.
SETTING_KEYS = [*PANEL_KEYS, "method", "budget_target", "setting", "lr"]

_RUN_COLUMNS = [
    "run_id", "method", "task", "run_dataset", "size", "model", "regime", "seed", "budget_target",
    "setting", "lr", "hp", "status", "error", "device", "device_type", "git_commit", "git_dirty", "versions",
    "command", "started_at", "finished_at", "source", "protocol",
    "trainable_params", "total_params", "budget_error", "adapter_file_bytes", *COST_COLUMNS,
    "mean_accuracy", "mean_accuracy_before",
    "dw_rank", "dw_effective_rank", "dw_max_rank", "dw_rank_frac", "dw_effective_rank_frac", "delta_rank",
]
COLUMNS = [*_RUN_COLUMNS[:4], "dataset", "accuracy", "accuracy_before", *_RUN_COLUMNS[4:]]

_MODEL_KEYS = ("name_or_path", "pretrained", "pretrained_model_name_or_path", "name", "id", "path")
_SHOT_KEYS = ("shots", "k_shot", "kshot", "num_shots", "n_shot")
_FRACTION_KEYS = ("fraction", "train_fraction", "data_fraction", "subset_fraction")


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
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    records: list[tuple[str, dict[str, Any]]] = []
    files = find_result_files(paths)
    for path in files:
        try:
            record = _read_json(path)
            _sections(record)
        except _Corrupt as exc:
            log.warning("skipping %s: %s", path, exc)
            skipped.append({"file": str(path), "reason": str(exc)})
            continue
        if not _parts_loaded(record, path, files):
            records.append((str(path), record))
    for source, record in combine_suites(records):
        rows.extend(record_to_rows(record, source=source))
    if not rows:
        raise ResultsError(f"no readable result files ({len(skipped)} skipped: {_first_reason(skipped)})")
    return _frame(rows, skipped)


def _parts_loaded(record: dict[str, Any], path: Path, files: list[Path]) -> bool:
    """A suite summary (`run.parts`) whose per-dataset files are loaded too: read those, not it."""
    parts = record.get("run", {}).get("parts") or {}
    return bool(parts) and all((path.parent / p).resolve() in files for p in parts.values())


def _suite_key(record: dict[str, Any]) -> str | None:
    """Identity of the suite run a per-dataset run belongs to: its config without the dataset."""
    run = record.get("run") or {}
    if not run.get("dataset") or not isinstance(run.get("config"), dict):
        return None
    config = {k: v for k, v in run["config"].items() if k not in ("dataset", "out_dir", "logger", "sweep")}
    if isinstance(config.get("task"), dict):
        config["task"] = {k: v for k, v in config["task"].items() if k != "dataset"}
    return json.dumps(config, sort_keys=True, default=str)


def combine_suites(records: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """Per-dataset runs of one suite configuration (same config but `dataset`, e.g. the jobs of a sweep
    over a suite) -> one record per suite run: each dataset's metrics plus their mean, so the report
    compares suites as the papers do. Failed parts make the suite record failed; others pass through."""
    groups: dict[str, list[tuple[str, dict[str, Any]]]] = {}
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


def _combined(members: list[tuple[str, dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
    records = [r for _, r in sorted(members, key=lambda m: m[1]["run"]["dataset"])]
    first = records[0]
    failed = [r for r in records if r["run"].get("status", "success") != "success"]
    run = {**first["run"], "dataset": None, "parts": {r["run"]["dataset"]: s for s, r in members}}
    if failed:
        run.update(status="failed", error="; ".join(f"{r['run']['dataset']}: {r['run'].get('error')}" for r in failed))
    metrics: dict[str, Any] = {}
    for key in ("per_dataset", "per_dataset_before"):
        metrics[key] = {d: v for r in records for d, v in (r.get("metrics") or {}).get(key, {}).items()}
        if metrics[key]:
            metrics["accuracy" if key == "per_dataset" else "accuracy_before"] = mean(metrics[key].values())
    metrics["delta_rank"] = {f"{r['run']['dataset']}/{k}": v for r in records
                             for k, v in ((r.get("metrics") or {}).get("delta_rank") or {}).items()}
    costs = [r.get("cost") or {} for r in records]
    cost = {k: mean(c[k] for c in costs if isinstance(c.get(k), (int, float)))
            for k in {k for c in costs for k in c} if any(isinstance(c.get(k), (int, float)) for c in costs)}
    if "train_time_s" in cost:
        cost["train_time_s"] = sum(c.get("train_time_s") or 0.0 for c in costs)
    source = "suite:" + ",".join(s for s, _ in sorted(members))
    return source, {**first, "run": run, "metrics": metrics, "cost": cost}


def load_wandb(path: str, api: Any | None = None) -> pd.DataFrame:
    """Tidy frame from a W&B project (`entity/project`) via the public API, same columns as files.

    `api` defaults to `wandb.Api()`; tests pass a stand-in with a `runs(path)` method.
    """
    if api is None:
        import wandb

        api = wandb.Api()
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for run in api.runs(path):
        source = f"wandb:{path}/{getattr(run, 'id', '?')}"
        try:
            rows.extend(record_to_rows(wandb_run_to_record(run), source=source))
        except _Corrupt as exc:
            log.warning("skipping %s: %s", source, exc)
            skipped.append({"file": source, "reason": str(exc)})
    if not rows:
        raise ResultsError(f"W&B project {path}: no usable runs")
    return _frame(rows, skipped)


def record_to_rows(record: Any, source: str = "") -> list[dict[str, Any]]:
    """One results.json record -> one row per evaluated dataset (one row for a failed run)."""
    run, params, cost, metrics = _sections(record)
    base = _run_fields(run, source)
    base.update(_param_fields(params))
    base.update(_cost_fields(cost))
    base.update(_metric_fields(metrics, base["status"]))
    base.update(_rank_fields(metrics.get("delta_rank")))
    return [{**base, **ds} for ds in _dataset_rows(metrics, base["run_dataset"], base["task"])]


def wandb_run_to_record(run: Any) -> dict[str, Any]:
    """Map a W&B run (config = resolved Hydra config, summary = params/cost/metrics) to a record."""
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
        info.setdefault(key, summary.get(key) or config.get(key))
    return {"schema": 1, "run": info, "params": summary.get("params") or {},
            "cost": summary.get("cost") or {}, "metrics": summary.get("metrics") or {}}


# ------------------------------------------------------------------------------------ sections


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise _Corrupt(f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _Corrupt(f"unreadable ({exc})") from None


def _sections(record: Any) -> tuple[dict, dict, dict, dict]:
    """Validate the top level; a success without metrics is a partial write, not a result."""
    if not isinstance(record, dict):
        raise _Corrupt(f"top level is {type(record).__name__}, expected an object")
    if record.get("schema", 1) != 1:
        log.warning("unknown result schema %r; reading it as schema 1", record.get("schema"))
    run = record.get("run")
    if not isinstance(run, dict) or not run.get("method"):
        raise _Corrupt("missing run section or run.method")
    sections = [record.get(k) or {} for k in ("params", "cost", "metrics")]
    if not all(isinstance(s, dict) for s in sections):
        raise _Corrupt("params/cost/metrics must be objects")
    status = run.get("status", "success")
    metrics = sections[2]
    if status == "success" and metrics.get("accuracy") is None and not metrics.get("per_dataset"):
        raise _Corrupt("status is success but metrics.accuracy is missing (partial file?)")
    return run, *sections


def _run_fields(run: dict, source: str) -> dict[str, Any]:
    config = run.get("config") if isinstance(run.get("config"), dict) else {}
    task_cfg = config.get("task") if isinstance(config.get("task"), dict) else {}
    hp = run.get("hp") or {}
    budget = _as_int(run.get("budget_target"))
    return {
        "run_id": run.get("id"), "method": run.get("method"), "task": run.get("task") or "?",
        "run_dataset": run.get("dataset"), "size": run.get("size") or _cfg_name(config.get("size")) or "?",
        "model": _model_name(task_cfg), "regime": _regime(task_cfg), "seed": _as_int(run.get("seed")),
        "budget_target": budget, "setting": _setting(budget, hp), "lr": run.get("lr") or _learning_rate(config, hp),  # run.lr: as used
        "hp": json.dumps(hp, sort_keys=True, default=str), "status": run.get("status", "success"),
        "error": run.get("error"), "device": run.get("device"), "device_type": _device_type(run),
        "git_commit": run.get("git_commit"),
        "git_dirty": run.get("git_dirty"), "versions": json.dumps(run.get("versions") or {}, sort_keys=True),
        "command": _command(run, config), "started_at": run.get("started_at"),
        "finished_at": run.get("finished_at"), "source": source,
        "protocol": json.dumps(run.get("protocol") or {}, sort_keys=True),
    }


def _param_fields(params: dict) -> dict[str, Any]:
    return {"trainable_params": params.get("trainable"), "total_params": params.get("total"),
            "budget_error": params.get("budget_error"), "adapter_file_bytes": params.get("adapter_file_bytes")}


def _cost_fields(cost: dict) -> dict[str, Any]:
    return {k: cost.get(k) for k in COST_COLUMNS}


def _device_type(run: dict) -> str | None:
    """"cpu" or the GPU model (`run.gpu.name`; older files: the name in `run.device`, "cuda:<name>"):
    step time and memory are comparable only between runs on the same kind of device."""
    gpu = run.get("gpu")
    if isinstance(gpu, dict) and gpu.get("name"):
        return str(gpu["name"])
    kind, _, name = str(run.get("device") or "").partition(":")
    if kind == "cuda":
        return name or "cuda"
    return kind or None


def _metric_fields(metrics: dict, status: str) -> dict[str, Any]:
    per = metrics.get("per_dataset") or {}
    before = metrics.get("per_dataset_before") or {}
    acc = metrics.get("accuracy")
    if acc is None and per:
        acc = sum(per.values()) / len(per)
    acc_before = metrics.get("accuracy_before")
    if acc_before is None and before:
        acc_before = sum(before.values()) / len(before)
    return {"mean_accuracy": acc, "mean_accuracy_before": acc_before}


def _rank_fields(delta_rank: Any) -> dict[str, Any]:
    """Mean over the sampled layers; rank fractions make layers of different shapes comparable."""
    out = dict.fromkeys(["dw_rank", "dw_effective_rank", "dw_max_rank", "dw_rank_frac",
                         "dw_effective_rank_frac"], math.nan)
    out["delta_rank"] = None
    layers = [v for v in (delta_rank or {}).values() if isinstance(v, dict) and v.get("max_rank")]
    if not layers:
        return out
    out.update(
        dw_rank=mean([float(v.get("rank", math.nan)) for v in layers]),
        dw_effective_rank=mean([float(v.get("effective_rank", math.nan)) for v in layers]),
        dw_max_rank=mean([float(v["max_rank"]) for v in layers]),
        dw_rank_frac=mean([float(v.get("rank", math.nan)) / v["max_rank"] for v in layers]),
        dw_effective_rank_frac=mean([float(v.get("effective_rank", math.nan)) / v["max_rank"] for v in layers]),
        delta_rank=json.dumps(delta_rank, sort_keys=True),
    )
    return out


def _dataset_rows(metrics: dict, run_dataset: str | None, task: str) -> list[dict[str, Any]]:
    per = metrics.get("per_dataset") or {}
    before = metrics.get("per_dataset_before") or {}
    if per:
        return [{"dataset": name, "accuracy": acc,
                 "accuracy_before": before.get(name, metrics.get("accuracy_before") if len(per) == 1 else None)}
                for name, acc in per.items()]
    return [{"dataset": run_dataset or task, "accuracy": metrics.get("accuracy"),
             "accuracy_before": metrics.get("accuracy_before")}]


# ------------------------------------------------------------------------------------- helpers


def _frame(rows: list[dict[str, Any]], skipped: list[dict[str, str]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("budget_target", "seed", "trainable_params", "total_params"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    numeric = ["accuracy", "accuracy_before", "mean_accuracy", "mean_accuracy_before", "lr", "budget_error",
               "adapter_file_bytes", *COST_COLUMNS]
    df[numeric] = df[numeric].apply(pd.to_numeric, errors="coerce")
    df.attrs["skipped"] = skipped
    n_failed = df.loc[df.status != "success", "source"].nunique()
    log.info("loaded %d runs (%d failed), skipped %d files", df["source"].nunique(), n_failed, len(skipped))
    return df


def _first_reason(skipped: list[dict[str, str]]) -> str:
    return f"{skipped[0]['file']}: {skipped[0]['reason']}" if skipped else "none"


def _as_int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _cfg_name(node: Any) -> str | None:
    if isinstance(node, dict):
        return node.get("name") or node.get("kind")
    return node if isinstance(node, str) else None


def _model_name(task_cfg: dict) -> str:
    """The backbone's name from the task config (`model.name`, `model.pretrained`, ...), else '?'."""
    model = task_cfg.get("model", task_cfg.get("backbone"))
    if isinstance(model, str):
        return model.rstrip("/").split("/")[-1]
    if isinstance(model, dict):
        for key in _MODEL_KEYS:
            if isinstance(model.get(key), str) and model[key]:
                return model[key].rstrip("/").split("/")[-1]
    return "?"


def _regime(task_cfg: dict) -> str:
    """Data regime from the task config: 'k-shot', 'NN% data' or 'full data'."""
    data = task_cfg.get("data") if isinstance(task_cfg.get("data"), dict) else {}
    for node in (task_cfg, data):
        for key in _SHOT_KEYS:
            if node.get(key):
                return f"{int(node[key])}-shot"
        for key in _FRACTION_KEYS:
            frac = node.get(key)
            if frac is not None and float(frac) < 1:
                return f"{float(frac) * 100:g}% data"
    return "full data"


def _setting(budget: int | None, hp: dict) -> str:
    """Seeds of one configuration share this key: the budget, or the hyper-parameters without seeds."""
    if budget is not None:
        return f"budget={budget}"
    return json.dumps({k: v for k, v in hp.items() if k != "seed"}, sort_keys=True, default=str)


def _learning_rate(config: dict, hp: dict) -> float | None:
    method = config.get("method") if isinstance(config.get("method"), dict) else {}
    trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
    for value in (hp.get("lr"), method.get("lr"), trainer.get("lr")):
        try:
            if value is not None:
                return float(value)
        except (TypeError, ValueError):
            continue
    return None


def _command(run: dict, config: dict) -> str:
    """The command line that produced the run: recorded if present, else rebuilt from the config."""
    for key in ("command", "argv"):
        value = run.get(key) or config.get(key)
        if value:
            return value if isinstance(value, str) else " ".join(map(str, value))
    overrides = run.get("overrides") or config.get("overrides")
    if overrides:
        return "python run.py " + " ".join(map(str, overrides))
    parts = [f"method={run.get('method')}", f"task={run.get('task')}", f"size={run.get('size')}",
             f"seed={run.get('seed')}"]
    if run.get("budget_target") is not None:
        parts.append(f"budget={run['budget_target']}")
    if run.get("dataset"):
        parts.append(f"dataset={run['dataset']}")
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
