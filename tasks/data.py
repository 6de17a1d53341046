"""Dataset loading shared by the tasks: generated datasets by name, or `datasets` sources from config.

A suite entry with no `task.data.sources.<name>` is generated (tasks/images.py, tasks/sentences.py).
With a source (`path`: a `save_to_disk` folder or a hub id, plus split/column names), the same code
loads it with `load_from_disk` / `load_dataset` — the seam paper-scale configs plug into.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from omegaconf import DictConfig

from tasks import images
from tasks.base import Task
from tasks.common import load_pretrained, selected
from tasks.regimes import apply_regime, regime_name, steps_for_epochs


@dataclass
class SplitPair:
    """One dataset of a suite: train/test `datasets.Dataset`s plus what prompts need."""

    name: str
    classes: list[str]
    template: str
    train: Dataset
    test: Dataset
    source: DictConfig | None = None  # the `task.data.sources.<name>` entry (None: generated)


def load_suite(
    data_cfg: DictConfig, names: list[str], generate: Callable[[str, str, int, int], Dataset],
    templates: dict[str, str] | None = None,
) -> dict[str, SplitPair]:
    """Load every dataset in `names`, from its configured source or from `generate(name, split, n, seed)`."""
    sources = data_cfg.get("sources") or {}
    out = {}
    for name in names:
        if name in sources:
            pair = _from_source(name, sources[name], data_cfg)
        else:
            train = generate(name, "train", int(data_cfg.train_size), data_seed_of(data_cfg))
            test = generate(name, "test", int(data_cfg.test_size), data_seed_of(data_cfg))
            classes = train.features["label"].names
            pair = SplitPair(name, classes, (templates or {}).get(name, "{}"), train, test)
        pair.train = apply_regime(name, pair.train, data_cfg)
        out[name] = pair
    return out


def data_seed_of(data_cfg: DictConfig) -> int:
    """Seed of generated data: fixed by config, not the run seed, so test sets match across seeds."""
    return int(data_cfg.get("seed", 0))


def _from_source(name: str, src: DictConfig, data_cfg: DictConfig | None = None) -> SplitPair:
    """A real dataset: `path` (save_to_disk folder or hub id, optional `config`), `train_split`,
    `test_split` (null: a seeded `test_fraction` of train), `image_column` / `text_column` /
    `text_pair_column`, `label_column`, and `classes` or `classes_file` (else the ClassLabel names)."""
    dd = open_source(name, src)
    train_split, test_split = src.get("train_split", "train"), src.get("test_split", "test")
    for split in (train_split, test_split):
        if split is not None and split not in dd:
            raise KeyError(f"dataset {name!r} at {src.path!r} has no split {split!r}; it has {', '.join(dd)}. "
                           f"Set task.data.sources.{name}.train_split / test_split.")
    train = dd[train_split]
    if test_split is None:  # e.g. Caltech101: one split only; a fixed seeded hold-out
        parts = train.train_test_split(test_size=float(src.get("test_fraction", 0.2)), seed=0)
        train, test = parts["train"], parts["test"]
    else:
        test = dd[test_split]
    renames = [(src.get("label_column"), "label"), (src.get("image_column"), "image"),
               (src.get("text_column"), "text"), (src.get("text_pair_column"), "text_pair")]
    for col, std in renames:
        if col and col != std:
            train, test = train.rename_column(col, std), test.rename_column(col, std)
    train, test = cap(train, (data_cfg or {}).get("train_size")), cap(test, (data_cfg or {}).get("test_size"))
    return SplitPair(name, source_classes(name, src, train), str(src.get("template", "a photo of a {}.")),
                     train, test, src)


def cap(ds: Dataset, size: int | None) -> Dataset:
    """At most `size` examples (a fixed seeded subset: quick runs, smoke tests); null = all."""
    if size is None or len(ds) <= int(size):
        return ds
    return ds.shuffle(seed=0).select(range(int(size)))


def open_source(name: str, src: DictConfig, key: str | None = None) -> DatasetDict:
    """`load_from_disk` for a local folder, the json loader for a local .json/.jsonl file (its one split
    named `json_split`), `load_dataset` for a hub id; one clear error otherwise, naming the config `key`
    to override (default task.data.sources.<name>)."""
    key = key or f"task.data.sources.{name}"
    path = src.get("path")
    if not path:
        raise FileNotFoundError(
            f"dataset {name!r} has no hub id configured (no verified public copy); prepare it locally "
            f"(DatasetDict.save_to_disk, or a .json file) and set {key}.path=<folder or file>.")
    path = str(path)
    try:
        if Path(path).is_file() and path.endswith((".json", ".jsonl")):  # e.g. LLM-Adapters' test.json files
            dd = load_dataset("json", data_files={str(src.get("json_split", "train")): path})
        else:
            dd = load_from_disk(path) if Path(path).is_dir() else load_dataset(path, src.get("config"))
    except Exception as e:  # network, missing files, wrong id: one clear line
        raise FileNotFoundError(
            f"could not load dataset {name!r} from {path!r} ({type(e).__name__}): no such local folder and "
            f"could not be reached on the Hugging Face hub. Set {key}.path to a "
            f"save_to_disk copy (made where the hub is reachable: "
            f"datasets.load_dataset({path!r}, {src.get('config')!r}).save_to_disk(<folder>))."
        ) from e
    if not isinstance(dd, DatasetDict):
        raise TypeError(f"dataset {name!r} at {path!r} has no splits; expected a DatasetDict")
    return dd


def source_classes(name: str, src: DictConfig, train: Dataset) -> list[str]:
    """Class names for prompts: config `classes`, else `classes_file` (one per line, in the dataset
    folder or hub repo), else the label column's ClassLabel names with underscores as spaces."""
    if src.get("classes"):
        return [str(c) for c in src.classes]
    if src.get("classes_file"):
        return _read_classes_file(name, src)
    feature = train.features.get("label")
    if hasattr(feature, "names"):
        return [str(c).replace("_", " ") for c in feature.names]
    return []  # a regression target (e.g. STS-B) has no classes


def _read_classes_file(name: str, src: DictConfig) -> list[str]:
    local = Path(str(src.path)) / str(src.classes_file)
    if not local.is_file():
        try:
            from huggingface_hub import hf_hub_download

            local = Path(hf_hub_download(str(src.path), str(src.classes_file), repo_type="dataset"))
        except Exception as e:
            raise FileNotFoundError(
                f"could not read class names of {name!r}: {src.classes_file!r} is neither in {src.path!r} nor "
                f"reachable on the hub. Set task.data.sources.{name}.classes=[...]") from e
    return [line.strip() for line in local.read_text().splitlines() if line.strip()]


def image_array(ds: Dataset, column: str = "image") -> np.ndarray:
    """(N, H, W, 3) uint8 from an Array3D column or a column of (same-sized) PIL images."""
    first = ds[0][column]
    if hasattr(first, "convert"):
        return np.stack([np.asarray(im.convert("RGB")) for im in ds[column]])
    return ds.with_format("numpy")[:][column].astype(np.uint8)


def pixel_values(ds: Dataset, processor: Any) -> torch.Tensor:
    """Images -> normalised (N, 3, H, W) float tensor, as the model's image processor would.

    Images already at the processor's crop size (the tiny suite) are normalised in one vectorised step;
    others (hub datasets: PIL images of any size and mode) go through the processor itself."""
    first = ds[0]["image"]
    if hasattr(first, "convert"):
        return processor(images=[im.convert("RGB") for im in ds["image"]], return_tensors="pt")["pixel_values"]
    arr = image_array(ds)
    crop = getattr(processor, "crop_size", None) or {}
    if arr.shape[1] == crop.get("height") and arr.shape[2] == crop.get("width"):
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
        mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
        return (x - mean) / std
    return processor(images=list(arr), return_tensors="pt")["pixel_values"]


class LazyPixels:
    """Pixels of a split processed per batch: hub-scale datasets (ImageNet: 1.28M images) do not fit in
    memory as tensors. Indexes like a tensor (`x[idx_tensor]`, `x[i:j]`), so tasks need not care."""

    def __init__(self, ds: Dataset, processor: Any) -> None:
        self.ds, self.processor = ds, processor

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, idx: slice | torch.Tensor) -> torch.Tensor:
        rows = range(*idx.indices(len(self))) if isinstance(idx, slice) else torch.as_tensor(idx).tolist()
        return pixel_values(self.ds.select(list(rows)), self.processor)


def labels(ds: Dataset) -> torch.Tensor:
    return torch.as_tensor(np.asarray(ds["label"]), dtype=torch.long)


def prepare_images(pair: SplitPair, processor: object, lazy: bool = False) -> tuple[Any, ...]:
    """(train_x, train_y, test_x, test_y) of one dataset; x are tensors, or `LazyPixels` when `lazy`."""
    pixels = (lambda ds: LazyPixels(ds, processor)) if lazy else (lambda ds: pixel_values(ds, processor))
    return pixels(pair.train), labels(pair.train), pixels(pair.test), labels(pair.test)


class EpochPlanMixin:
    """`planned_steps`: trainer.max_steps derived from epochs, for tasks whose config names them.

    Epochs come from `task.data.epochs` (one number for every dataset) or each source's `epochs`
    (the paper's per-dataset table); in a k-shot regime from `task.data.shot_epochs`, with at least
    `task.data.min_steps_per_epoch` steps per epoch (the RandLoRA over-sampling rule)."""

    cfg: DictConfig

    def train_sizes(self) -> dict[str, int]:
        return {name: len(pair.train) for name, pair in self.suite.items()}  # type: ignore[attr-defined]

    def planned_steps(self, batch_size: int, grad_accum: int = 1) -> int | None:
        data = self.cfg.data
        shots = data.get("shots")
        sources = data.get("sources") or {}
        epochs = {}
        for name in self.datasets:  # type: ignore[attr-defined]
            per_source = (sources.get(name) or {}).get("epochs")
            value = data.get("shot_epochs") if shots else (data.get("epochs") or per_source)
            if value is None:
                return None  # no epochs configured: trainer.max_steps decides
            epochs[name] = value
        min_steps = int(data.get("min_steps_per_epoch", 0) or 0) if shots else 0
        return steps_for_epochs(self.train_sizes(), epochs, batch_size * grad_accum, min_steps)

    @property
    def regime(self) -> str:
        return regime_name(self.cfg.data.get("shots"), self.cfg.data.get("fraction"))


class ImageSuiteTask(EpochPlanMixin, Task):
    """Shared by clip and vision: the image suite of `task.data`, restricted by `task.dataset`."""

    @property
    def datasets(self) -> list[str]:
        return selected(list(self.cfg.data.datasets), self.cfg.get("dataset"))

    @cached_property
    def processor(self) -> object:
        from transformers import AutoImageProcessor

        return load_pretrained(AutoImageProcessor.from_pretrained, self.cfg.model.path)

    @property
    def lazy(self) -> bool:
        """Process pixels per batch (hub datasets) instead of once up front (the tiny suite)."""
        return self.cfg.data.get("preprocess", "eager") == "lazy"

    @cached_property
    def suite(self) -> dict[str, SplitPair]:
        templates = {k: s.template for k, s in images.SPECS.items()}
        return load_suite(self.cfg.data, self.datasets, images.make_split, templates)
