"""What a launch is checked against before any GPU time is spent: a suite's data and model, from metadata.

For every dataset of the run's suite: where it comes from, its splits and sizes, its columns, its class
names exactly as prompts will use them and the first prompts -- read from metadata only (the hub's file
listing and dataset card, or a local `save_to_disk` folder), never by downloading the data -- and each
used split's label range (a ClassLabel's from the card, integer labels from a bounded streaming read of
the first rows), which must fit [0, number of class names) after the source's `label_offset`. For the
model: its config (no weights), a `meta`-device skeleton, the Linear layers the task's targets match and
each adapter method's exact parameter count at the checked budgets. `python -m runners.preflight` prints
it; SLURM sweeps run it on the submitting machine before the job array is submitted
(runners/sweeps/presubmit.py).
"""
from __future__ import annotations

import functools
import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from runners.engine.config import CONF_DIR

log = logging.getLogger("rankbench.preflight")

# conf/sweep/budget.yaml's axis
DEFAULT_BUDGETS = ["lora1", "lora2", "lora4", "lora8", "lora16", "lora32", "native"]
PROMPTS_SHOWN = 3
LABEL_ROWS = 500  # rows a hub label check streams per split: the first shard's start, a bounded read


@dataclass
class DatasetReport:
    """What the launch check found about one dataset of the suite."""

    dataset: str
    source: dict[str, Any]
    splits: dict[str, int | None] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)
    num_classes: int | None = None
    classes: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, dict[str, Any]] = field(default_factory=dict)  # per used split: dtype, min, max, from


# --- datasets ----------------------------------------------------------------------------------------

def check_dataset(name: str, src: DictConfig | None, task_cfg: DictConfig, key: str | None = None
                  ) -> DatasetReport:
    """One dataset's record: metadata from a local folder or the hub, then classes and prompts."""
    key = key or f"task.data.sources.{name}"
    if src is None:
        return DatasetReport(name, {"generated": True}, problems=[])  # the tiny suite's generated data
    rec = DatasetReport(name, {"path": src.path, "config": src.config})
    path = src.path
    if not path:
        rec.problems.append(f"no path: no verified public copy is configured; "
                            f"set {key}.path=<folder or file>")
        return rec
    try:
        local = Path(str(path)).exists()
        meta = _local_metadata(str(path), src) if local else _hub_metadata(str(path), src)
    except LookupError as err:
        rec.problems.append(str(err))
        _show_configured_classes(rec, name, src, task_cfg)
        return rec
    rec.splits, rec.columns = meta["splits"], meta["columns"]
    _check_splits_and_columns(rec, src, key)
    _fill_classes(rec, name, src, _label_names(meta["features"], src), task_cfg)
    _check_labels(rec, name, src,
                  meta["labels"] if local else _hub_labels(str(path), src, meta["features"], rec))
    return rec


def _used_splits(src: DictConfig) -> list[str]:
    """The splits a run reads: train, test (unless held out of train) and the source's own validation."""
    splits = [src.train_split, src.test_split, src.val_split]
    return [s for s in splits if s is not None]


def _feature_type(feature: Any) -> str:
    """`ClassLabel`, else the column's value type (int64, float32, ...)."""
    return ("ClassLabel" if hasattr(feature, "names")
            else str(getattr(feature, "dtype", type(feature).__name__)))


def _label_stats(values: Any, names: list[str] | None = None, dtype: str | None = None) -> dict[str, Any]:
    """dtype (the column's feature type where known), min and max of a label column (min/max only for integer
    labels: regression targets have none), and with the rows' own class names (`name_column`) each distinct
    (label, name) pair."""
    import numpy as np

    ys = np.asarray(values)
    dtype = dtype or str(ys.dtype)
    if not len(ys) or not np.issubdtype(ys.dtype, np.integer):
        return {"dtype": dtype, "rows": len(ys)}
    stats = {"dtype": dtype, "min": int(ys.min()), "max": int(ys.max()), "rows": len(ys)}
    if names is None:
        return stats
    return {**stats, "pairs": sorted(set(zip(ys.tolist(), names, strict=True)))}


def _hub_labels(path: str, src: DictConfig, features: Any, rec: DatasetReport) -> dict[str, dict[str, Any]]:
    """Label range per used split: [0, len(names)) for a ClassLabel of the card, else the first LABEL_ROWS
    rows read by streaming (integer labels: webdataset `cls`, a parquet int64 column)."""
    column = src.label_column or "label"
    feature = (features or {}).get(column)
    splits = [s for s in _used_splits(src) if not rec.splits or s in rec.splits]
    if hasattr(feature, "names"):
        return {s: {"dtype": "ClassLabel", "min": 0, "max": len(feature.names) - 1, "from": "card"}
                for s in splits}
    return {s: _stream_labels(path, src, s, column) for s in splits}


def _stream_labels(path: str, src: DictConfig, split: str, column: str) -> dict[str, Any]:
    """The label column of a split's first LABEL_ROWS rows, streamed (no split is downloaded or prepared)."""
    from datasets import load_dataset

    from tasks.sources import hub_kwargs

    named = src.name_column
    try:
        stream = load_dataset(path, src.config, split=split, streaming=True, **hub_kwargs(src))
        rows = list(itertools.islice(stream.select_columns([column, *([named] if named else [])]),
                                     LABEL_ROWS))
    except Exception as err:  # any read failure is the problem to report
        return {"problem": f"labels of split {split!r} unreadable ({type(err).__name__}: {first_line(err)})"}
    names = [str(r[named]) for r in rows] if named else None
    return {**_label_stats([r[column] for r in rows], names), "from": f"first {len(rows)} rows (streamed)"}


def _check_labels(rec: DatasetReport, name: str, src: DictConfig, stats: dict[str, dict[str, Any]]) -> None:
    """Labels (plus the source's label_offset) outside [0, number of class names) are a problem (an
    off-by-one copy, a names list of the wrong length), and so are row names (`name_column`) that most
    labels' prompt names contradict (shifted labels, names in another order)."""
    rec.labels = stats
    offset = int(src.label_offset)
    for split, st in stats.items():
        if "problem" in st:
            rec.problems.append(st["problem"])
        elif "min" in st and rec.num_classes:
            problem = _label_problem(name, split, st, offset, rec.classes, src.name_column)
            if problem:
                rec.problems.append(problem.removeprefix(f"dataset {name!r}, "))


def _label_problem(name: str, split: str, st: dict[str, Any], offset: int, classes: list[str],
                   named: str | None) -> str | None:
    from tasks.labels import label_names_problem, label_range_problem

    problem = label_range_problem(name, split, st["min"] + offset, st["max"] + offset, len(classes))
    if problem or "pairs" not in st:
        return problem
    return label_names_problem(name, split, [(y + offset, n) for y, n in st["pairs"]], classes, str(named))


def _local_metadata(path: str, src: DictConfig) -> dict[str, Any]:
    """Splits, sizes, columns, label names and each used split's label range of a save_to_disk folder or a
    .json file (memory-mapped: only the label column is read)."""
    from datasets import load_dataset, load_from_disk

    dd = load_dataset("json", data_files=path) if path.endswith((".json", ".jsonl")) else load_from_disk(path)
    first = next(iter(dd.values()))
    column, named = src.label_column or "label", src.name_column
    labels = {s: _label_stats(dd[s][column], dd[s][named] if named in dd[s].column_names else None,
                              _feature_type(dd[s].features[column]))
              for s in _used_splits(src) if s in dd and column in dd[s].column_names}
    return {"splits": {s: len(d) for s, d in dd.items()}, "columns": list(first.column_names),
            "features": first.features, "labels": labels}


def _hub_metadata(path: str, src: DictConfig) -> dict[str, Any]:
    """Splits, sizes and columns from the hub: the repo's file listing, then the dataset card's metadata
    (load_dataset_builder reads README.md and the data-file layout, not the data)."""
    files = _repo_files(path)
    if (script := loading_script(path, files)) is not None:
        raise LookupError(f"{path} ships a loading script ({script}), which datasets>=4 refuses: "
                          "use a parquet/webdataset copy")
    if src.classes_file and str(src.classes_file) not in files:
        raise LookupError(f"{path} has no {src.classes_file} at its root")
    from datasets import load_dataset_builder

    from tasks.sources import hub_kwargs

    try:
        builder = load_dataset_builder(path, src.config, **hub_kwargs(src))
    except Exception as err:  # any load failure is the problem to report
        raise LookupError(f"{path}: metadata unreadable ({type(err).__name__}: {first_line(err)})") from err
    info = builder.info
    splits = {s: v.num_examples for s, v in (info.splits or {}).items()}
    if not splits and src.data_files:
        splits = {s: None for s in src.data_files}  # webdataset: sizes are not in the metadata
    features = info.features or {}
    return {"splits": splits, "columns": list(features), "features": features}


def loading_script(path: str, files: list[str]) -> str | None:
    """The repo's loading script, if it ships one: only `<repo name>.py` at the root counts (datasets >= 4
    raises for exactly that file, datasets/load.py dataset_module_factory); other root .py files, such as
    bentrevett/caltech-ucsd-birds-200-2011's script.py, are plain files."""
    script = f"{path.rstrip('/').rsplit('/', 1)[-1]}.py"
    return script if script in files else None


def _label_names(features: Any, src: DictConfig) -> list[str] | None:
    """The label column's ClassLabel names, or None for integer labels (or unknown columns)."""
    feature = (features or {}).get(src.label_column or "label")
    return list(feature.names) if hasattr(feature, "names") else None


@functools.cache
def _repo_files(path: str, repo_type: str = "dataset") -> list[str]:
    """The hub repo's file names (one metadata request, no retries: an offline machine answers in well
    under a second, where list_repo_files backs off for ~20 s); LookupError naming why not."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    api = HfApi()
    try:
        info = api.dataset_info(path) if repo_type == "dataset" else api.model_info(path)
        return [s.rfilename for s in info.siblings or []]
    except GatedRepoError as err:
        raise LookupError(f"{path} is gated: accept its terms on the hub and log in (hf auth login)") from err
    except RepositoryNotFoundError as err:
        raise LookupError(f"{path}: no such {repo_type} repo on the hub") from err
    except Exception as err:  # the plan is a report: any failure is shown, never fatal
        raise LookupError(f"{path}: hub unreachable ({type(err).__name__}: {first_line(err)})") from err


def _check_splits_and_columns(rec: DatasetReport, src: DictConfig, key: str) -> None:
    train, test = src.train_split, src.test_split
    for split, what in ((train, "train_split"), (test, "test_split")):
        if split is not None and rec.splits and split not in rec.splits:
            rec.problems.append(f"no split {split!r} (has {', '.join(rec.splits)}); set {key}.{what}")
    if not rec.columns:
        return  # webdataset repos: columns are only known from the data; the run checks them
    for col_key in ("image_column", "label_column", "text_column", "text_pair_column"):
        col = src[col_key]
        if col and col not in rec.columns:
            rec.problems.append(f"no column {col!r} (has {', '.join(rec.columns)}); set {key}.{col_key}")


def _fill_classes(rec: DatasetReport, name: str, src: DictConfig, label_names: list[str] | None,
                  task_cfg: DictConfig) -> None:
    """Class names as prompts will use them (curated, aligned) and the first prompts."""
    from tasks.prompts import source_classes

    try:
        rec.classes = source_classes(name, src, label_names)
    except (ValueError, KeyError, FileNotFoundError) as err:
        rec.problems.append(first_line(err))
        return
    rec.num_classes = len(rec.classes) or None
    _show_prompts(rec, name, src, task_cfg)


def _show_configured_classes(rec: DatasetReport, name: str, src: DictConfig, task_cfg: DictConfig) -> None:
    """With no metadata, the class names the config itself names (curated set or `classes`), in their own
    order: prompts can still be read, though their alignment to the copy's labels is unchecked."""
    from tasks.prompts import prompt_set

    entry = prompt_set(name, src)
    rec.classes = [str(c) for c in src.classes or (entry or {}).get("classes", [])]
    rec.num_classes = len(rec.classes) or None
    _show_prompts(rec, name, src, task_cfg)


def _show_prompts(rec: DatasetReport, name: str, src: DictConfig, task_cfg: DictConfig) -> None:
    """The first prompts evaluation will score `rec.classes` with; a prompt choice it would refuse is a
    problem of the record."""
    from tasks.prompts import source_templates

    try:
        templates = _eval_templates(source_templates(name, src), task_cfg)
    except (ValueError, KeyError, FileNotFoundError) as err:
        rec.problems.append(first_line(err))
        return
    rec.prompts = [t.format(c) for t in templates for c in rec.classes][:PROMPTS_SHOWN]


def _eval_templates(dataset_templates: list[str], task_cfg: DictConfig) -> list[str]:
    """The templates the task's evaluation formats class names with: CLIP's `objective.prompts.eval`,
    the whole ensemble under the vision task's prompt head, none under a trained head."""
    from tasks.prompts import templates_for

    if task_cfg.kind == "clip":
        return templates_for(str(task_cfg.objective.prompts.eval), dataset_templates)
    if task_cfg.kind == "vision" and task_cfg.model.head == "prompts":
        return dataset_templates
    return []


# --- the model ---------------------------------------------------------------------------------------

def check_model(cfg: DictConfig, budgets: list[str], method_names: list[str] | None = None) -> dict[str, Any]:
    """The model's config (no weights), its targets on a meta skeleton and the exact count of each method
    (`method_names`; None: every registered one)."""
    import methods
    from tasks.models import resolve_model_path

    path = str(cfg.task.model.path)
    out: dict[str, Any] = {"path": path, "targets": [], "counts": {}, "problems": []}
    try:
        resolved = resolve_model_path(path)
        if not Path(resolved).exists():
            _repo_files(resolved, "model")  # fails fast when the hub is unreachable (from_pretrained retries)
        model = _skeleton(resolved, cfg.task)
    except LookupError as err:
        out["problems"].append(f"model {err}; set task.model.path")
        return out
    except Exception as err:
        out["problems"].append(f"model {path}: config unreadable or hub unreachable "
                               f"({type(err).__name__}: {first_line(err)}); set task.model.path")
        return out
    import tasks

    targets = tasks.build(cfg.task).target_modules
    try:
        found = methods.find_targets(model, targets)
    except ValueError as err:
        out["problems"].append(first_line(err))
        return out
    out["targets"] = sorted({n.rsplit(".", 1)[-1] for n in found})
    out["target_layers"] = len(found)
    for method in method_names or methods.available():
        out["counts"][method] = {str(b): _solve(model, method, targets, b, cfg.task) for b in budgets}
    return out


def _skeleton(path: str, task_cfg: DictConfig) -> Any:
    """The task's backbone built from its config on the meta device: shapes, no memory, no download. Unlike
    the memory plan's skeleton, an unreadable config is a problem to report, not a published fallback."""
    from transformers import AutoConfig

    from runners.engine.memplan import model_from_config

    return model_from_config(AutoConfig.from_pretrained(path), task_cfg)


def _solve(model: Any, method: str, targets: Any, budget: str, task: Any = None) -> dict[str, Any]:
    """The solver's plan as a run makes it (with the method config's hp): the knobs, how many layers
    have their own r, the exact count, its error and whether it is within the solver's tolerance."""
    import methods

    try:
        sol = methods.solve_budget_report(model, method, targets, budget, **_method_hp(method, task))
    except ValueError as err:
        return {"problem": first_line(err)}
    return {"hp": sol.hp, "own_r": len(sol.rank_pattern),
            "target": sol.target, "achieved": sol.achieved, "error": sol.rel_error, "reached": sol.reached}


def _method_hp(method: str, task: Any = None) -> dict[str, Any]:
    """conf/method/<method>.yaml's hyper-parameters (what `budget=native` means) under the task's adapter
    convention (task.scaling / task.conventions; None: PEFT's); {} without a method config."""
    from omegaconf import OmegaConf

    from runners.engine.adapt import NOT_HP

    path = CONF_DIR / "method" / f"{method}.yaml"
    if not path.exists():
        return {}
    task = task if task is not None else {"scaling": "peft", "conventions": {}}
    node = OmegaConf.create({"task": task, "method": OmegaConf.load(path)})
    hp = OmegaConf.to_container(node.method, resolve=True)
    return {k: v for k, v in hp.items() if k not in NOT_HP}


# --- the whole suite ---------------------------------------------------------------------------------

def check_suite(cfg: DictConfig, budgets: list[str] | None = None) -> list[DatasetReport]:
    """Records for every dataset of the run's suite (plus a commonsense training set), model attached."""
    import tasks
    from tasks.sources import source_config

    task = tasks.build(cfg.task)
    budgets = budgets or ([str(cfg.budget)] if cfg.get("budget") is not None else DEFAULT_BUDGETS)
    records = [check_dataset(n, source_config(cfg.task.data, n), cfg.task) for n in task.datasets]
    if (train := task.train_source) is not None:
        records.insert(0, check_dataset("train", train[0], cfg.task, key=train[1]))
    model = check_model(cfg, budgets)
    for rec in records:
        rec.model = model
    return records


def problems(records: list[DatasetReport]) -> list[str]:
    """Every problem, once each: the model's, then each dataset's (prefixed with its name)."""
    out = list(records[0].model.get("problems", [])) if records else []
    return out + [f"{r.dataset}: {p}" for r in records for p in r.problems]


def table(records: list[DatasetReport]) -> str:
    """One line per dataset: source, splits (sizes), class count, first prompt, problems."""
    rows = [("dataset", "source", "splits", "classes", "first prompt", "problems")]
    for r in records:
        splits = ", ".join(f"{s} {n:,}" if n is not None else s for s, n in r.splits.items()) or "-"
        source = "generated" if r.source.get("generated") else f"{r.source.get('path')}" + (
            f" ({r.source['config']})" if r.source.get("config") else "")
        rows.append((r.dataset, source, splits, str(r.num_classes or "-"), (r.prompts or ["-"])[0],
                     "; ".join(r.problems) or "ok"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:5], widths, strict=True)) + "  " + row[5]
             for row in rows]
    return "\n".join(lines)


def model_table(model: dict[str, Any]) -> str:
    lines = ["; ".join(model["problems"]) if model["problems"] else
             f"model {model['path']}: {model.get('target_layers', 0)} target layers "
             f"({', '.join(model['targets'])})"]
    for method, per_budget in model.get("counts", {}).items():
        cells = [_count_cell(b, v) for b, v in per_budget.items()]
        lines.append(f"  {method:<9} " + " | ".join(cells))
    return "\n".join(lines)


def _count_cell(budget: str, v: dict[str, Any]) -> str:
    if "achieved" not in v:
        return f"{budget}: {v['problem']}"
    knobs = {k: x for k, x in v["hp"].items() if k != "rank_pattern"}
    own = f" +{v['own_r']} layers own r" if v["own_r"] else ""
    return (f"{budget}: {v['achieved']:,} ({v['error']:+.2%}{'' if v['reached'] else ', NOT REACHED'}) "
            f"{knobs}{own}")


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line (a problem is one line of the report)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
