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


@dataclass
class SplitPair:
    """One dataset of a suite: train/test `datasets.Dataset`s plus what prompts need."""

    name: str
    classes: list[str]
    template: str
    train: Dataset
    test: Dataset


def load_suite(
    data_cfg: DictConfig, names: list[str], generate: Callable[[str, str, int, int], Dataset],
    templates: dict[str, str] | None = None,
) -> dict[str, SplitPair]:
    """Load every dataset in `names`, from its configured source or from `generate(name, split, n, seed)`."""
    sources = data_cfg.get("sources") or {}
    out = {}
    for name in names:
        if name in sources:
            out[name] = _from_source(name, sources[name])
            continue
        train = generate(name, "train", int(data_cfg.train_size), data_seed_of(data_cfg))
        test = generate(name, "test", int(data_cfg.test_size), data_seed_of(data_cfg))
        classes = train.features["label"].names
        out[name] = SplitPair(name, classes, (templates or {}).get(name, "{}"), train, test)
    return out


def data_seed_of(data_cfg: DictConfig) -> int:
    """Seed of generated data: fixed by config, not the run seed, so test sets match across seeds."""
    return int(data_cfg.get("seed", 0))


def _from_source(name: str, src: DictConfig) -> SplitPair:
    """A real dataset: `path` (save_to_disk folder or hub id), `train_split`, `test_split`,
    `image_column`/`text_column`, `label_column`, optional `classes` and `template`."""
    path = str(src.path)
    try:
        dd = load_from_disk(path) if Path(path).is_dir() else load_dataset(path, src.get("config"))
    except Exception as e:  # network, missing files, wrong id: one clear line
        raise FileNotFoundError(
            f"could not load dataset {name!r} from {path!r} ({type(e).__name__}): no such local folder and "
            f"not reachable on the Hugging Face hub. Set task.data.sources.{name}.path to a save_to_disk copy."
        ) from e
    if not isinstance(dd, DatasetDict):
        raise TypeError(f"dataset {name!r} at {path!r} has no splits; expected a DatasetDict")
    train, test = dd[src.get("train_split", "train")], dd[src.get("test_split", "test")]
    for col, std in [(src.get("label_column"), "label"), (src.get("image_column"), "image"), (src.get("text_column"), "text")]:
        if col and col != std:
            train, test = train.rename_column(col, std), test.rename_column(col, std)
    classes = list(src.classes) if src.get("classes") else list(train.features["label"].names)
    return SplitPair(name, classes, str(src.get("template", "a photo of a {}.")), train, test)


def image_array(ds: Dataset, column: str = "image") -> np.ndarray:
    """(N, H, W, 3) uint8 from an Array3D column or a column of PIL images."""
    first = ds[0][column]
    if hasattr(first, "convert"):
        return np.stack([np.asarray(im.convert("RGB")) for im in ds[column]])
    return ds.with_format("numpy")[:][column].astype(np.uint8)


def pixel_values(ds: Dataset, processor: Any) -> torch.Tensor:
    """Images -> normalised (N, 3, H, W) float tensor, as the model's image processor would.

    Images already at the processor's crop size (the tiny suite) are normalised in one vectorised step;
    others go through the processor itself (resize + crop + normalise)."""
    arr = image_array(ds)
    crop = getattr(processor, "crop_size", None) or {}
    if arr.shape[1] == crop.get("height") and arr.shape[2] == crop.get("width"):
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
        mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
        return (x - mean) / std
    return processor(images=list(arr), return_tensors="pt")["pixel_values"]


def labels(ds: Dataset) -> torch.Tensor:
    return torch.as_tensor(np.asarray(ds["label"]), dtype=torch.long)


def prepare_images(pair: SplitPair, processor: object) -> tuple[torch.Tensor, ...]:
    """(train_x, train_y, test_x, test_y) tensors of one dataset."""
    return pixel_values(pair.train, processor), labels(pair.train), pixel_values(pair.test, processor), labels(pair.test)


class ImageSuiteTask(Task):
    """Shared by clip and vision: the image suite of `task.data`, restricted by `task.dataset`."""

    @property
    def datasets(self) -> list[str]:
        return selected(list(self.cfg.data.datasets), self.cfg.get("dataset"))

    @cached_property
    def processor(self) -> object:
        from transformers import AutoImageProcessor

        return load_pretrained(AutoImageProcessor.from_pretrained, self.cfg.model.path)

    @cached_property
    def suite(self) -> dict[str, SplitPair]:
        templates = {k: s.template for k, s in images.SPECS.items()}
        return load_suite(self.cfg.data, self.datasets, images.make_split, templates)
