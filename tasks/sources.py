"""A configured data source opened: `task.data.sources.<name>` (or `task.data.train`) to a DatasetDict.

A source names a `save_to_disk` folder, a local .json file or a hub id plus its split and column names;
`load_from_disk` / `load_dataset` open it, so the tiny suite's tests and paper-scale runs share one code
path. Every key a source may set, and its default, is declared once in conf/task/sources/defaults.yaml and
merged into each source by `source_config`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from omegaconf import DictConfig, OmegaConf

from tasks.models import hub_revision

log = logging.getLogger(__name__)


def source_config(data_cfg: DictConfig, name: str) -> DictConfig | None:
    """`task.data.sources.<name>` with every key it leaves out taken from `task.data.source_defaults`; None
    for a dataset with no source (a generated one)."""
    if name not in data_cfg.sources:
        return None
    return with_source_defaults(data_cfg.source_defaults, data_cfg.sources[name], f"task.data.sources.{name}")


def with_source_defaults(defaults: DictConfig, src: DictConfig, key: str) -> DictConfig:
    """`src` over `defaults` (conf/task/sources/defaults.yaml), so every reader sees every key; a key the
    defaults do not declare is a misspelling or a key nothing reads: one clear error naming the valid ones."""
    unknown = sorted(set(src) - set(defaults))
    if unknown:
        raise ValueError(f"{key} sets {', '.join(unknown)}, which no data source reads; valid keys: "
                         f"{', '.join(defaults)} (conf/task/sources/defaults.yaml)")
    return OmegaConf.merge(defaults, src)  # type: ignore[return-value]  # two DictConfigs merge to one


def open_source(name: str, src: DictConfig, key: str | None = None,
                splits: list[str] | None = None) -> DatasetDict:
    """`load_from_disk` for a `save_to_disk` folder, the json loader for a local .json/.jsonl file (its one
    split named `json_split`), `load_dataset` for a hub id or a local folder laid out as the hub repo is (a
    clone); one clear error otherwise, naming the config `key` to override (default task.data.sources.<name>).
    `splits`: the only splits to download and prepare (`load_dataset` prepares every split it is given files
    for, whatever split is asked: datasets 5.2 src/datasets/load.py `load_dataset`); None: all of them."""
    key = key or f"task.data.sources.{name}"
    if not src.path:
        raise FileNotFoundError(
            f"dataset {name!r} has no hub id configured (no verified public copy); prepare it locally "
            f"(DatasetDict.save_to_disk, or a .json file) and set {key}.path=<folder or file>.")
    path = str(src.path)
    try:
        dd = _load(path, src, splits)
    except Exception as e:  # network, missing files, wrong id: one clear line
        raise _load_error(name, path, src, key, e) from e
    if not isinstance(dd, DatasetDict):
        raise TypeError(f"dataset {name!r} at {path!r} has no splits; expected a DatasetDict")
    return dd


def _load(path: str, src: DictConfig, splits: list[str] | None) -> Any:
    """The loader `path` calls for: json for a local .json/.jsonl file, load_from_disk for a saved copy, else
    load_dataset (a hub id or a clone of a hub repo)."""
    if Path(path).is_file() and path.endswith((".json", ".jsonl")):  # e.g. LLM-Adapters' test.json files
        return load_dataset("json", data_files={str(src.json_split): path})
    if is_saved_copy(path):
        return load_from_disk(path)
    return load_dataset(path, src.config, **hub_kwargs(src, splits))


def _load_error(name: str, path: str, src: DictConfig, key: str, err: Exception) -> Exception:
    """The one-line error of a failed load: a script-based hub repo, or a copy neither here nor reachable."""
    if is_script_error(err):
        return RuntimeError(
            f"dataset {name!r} at {path!r} is a script-based hub repo, which datasets>=4 no longer "
            f"loads: point {key}.path at a parquet/webdataset copy or a local save_to_disk folder")
    return FileNotFoundError(
        f"could not load dataset {name!r} from {path!r} ({type(err).__name__}): no such local folder and "
        f"could not be reached on the Hugging Face hub. Set {key}.path to a "
        f"save_to_disk copy (made where the hub is reachable: "
        f"datasets.load_dataset({path!r}, {src.config!r}).save_to_disk(<folder>)).")


def hub_kwargs(src: DictConfig, splits: list[str] | None = None) -> dict[str, Any]:
    """`load_dataset` kwargs of a hub source: its pinned `revision`, and the `data_files` of `splits` only
    (all splits' files when `splits` is None)."""
    files = split_files(src, splits)
    kwargs: dict[str, Any] = {"data_files": files} if files else {}
    return {**kwargs, "revision": str(src.revision)} if src.revision else kwargs


def split_files(src: DictConfig, splits: list[str] | None) -> dict[str, Any] | None:
    """Each split's files, restricted to `splits`: the source's `data_files` patterns (webdataset split
    folders), else the files the repo itself assigns each split (its card's `configs`, else the hub's file
    naming convention), which `load_dataset_builder` resolves from the file listing without downloading
    data. A split the repo lacks is left out here and named by `_check_splits`. None: no restriction."""
    if src.data_files:
        files: dict[str, Any] | None = {str(k): str(v) for k, v in src.data_files.items()}
    else:
        files = _repo_split_files(src) if splits is not None else None
    if files is None or splits is None or not set(splits) & set(files):
        return files
    return {s: f for s, f in files.items() if s in splits}


def _repo_split_files(src: DictConfig) -> dict[str, list[str]] | None:
    """{split: resolved files} of a hub repo (or a local clone of one); None where the builder names none."""
    from datasets import load_dataset_builder

    kwargs = {"revision": str(src.revision)} if src.revision else {}
    data_files = load_dataset_builder(str(src.path), src.config, **kwargs).config.data_files
    return {str(split): list(files) for split, files in data_files.items()} if data_files else None


def is_saved_copy(path: str) -> bool:
    """A `save_to_disk` folder (DatasetDict or Dataset), as opposed to a hub id or a clone of a hub repo."""
    return Path(path, "dataset_dict.json").is_file() or Path(path, "state.json").is_file()


def source_revision(src: DictConfig) -> str | None:
    """What results.json records as the source's revision: None for a local folder or file, else the hub
    commit it resolves to (the pinned `revision`, if the source sets one, or the default branch)."""
    return hub_revision(str(src.path), "dataset", str(src.revision) if src.revision else None)


def is_script_error(err: BaseException) -> bool:
    """datasets >= 4 refuses hub repos that still ship a loading script (a RuntimeError whose message
    says dataset scripts are no longer supported; datasets 4.0.0 src/datasets/load.py)."""
    return isinstance(err, RuntimeError) and "scripts are no longer supported" in str(err)


def standard_columns(ds: Dataset | None, src: DictConfig) -> Dataset | None:
    """The source's label / image / text columns renamed to the names the tasks read."""
    renames = [(src.label_column, "label"), (src.image_column, "image"), (src.text_column, "text"),
               (src.text_pair_column, "text_pair")]
    for col, std in renames:
        if ds is not None and col and col != std:
            ds = ds.rename_column(col, std)
    return ds
