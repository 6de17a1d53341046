"""Images to the normalised pixel tensors a vision backbone takes, eagerly or per batch.

The tiny suite's images are processed once up front; hub datasets per batch (`LazyPixels`), with the
training augmentation of the paper suites (tasks/augment.py).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from datasets import Dataset

from tasks.augment import Augment, batch_rng, example_rngs
from tasks.splits import SplitPair


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
    if len(ds) == 0:  # a probe's unread train split (load_test_split)
        return torch.empty(0)
    first = ds[0]["image"]
    if hasattr(first, "convert"):
        return processor(images=[im.convert("RGB") for im in ds["image"]],
                         return_tensors="pt")["pixel_values"]
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
    memory as tensors. Indexes like a tensor (`x[idx_tensor]`, `x[i:j]`), so tasks need not care.
    With `augment` (training splits of the paper suites) each batch is randomly cropped and flipped,
    then only rescaled and normalised by the processor."""

    def __init__(self, ds: Dataset, processor: Any, augment: Augment | None = None, seed: int = 0) -> None:
        self.ds, self.processor, self.augment, self.seed = ds, processor, augment, seed

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, idx: slice | torch.Tensor) -> torch.Tensor:
        rows = range(*idx.indices(len(self))) if isinstance(idx, slice) else torch.as_tensor(idx).tolist()
        part = self.ds.select(list(rows))
        if self.augment is None:
            return pixel_values(part, self.processor)
        images = self.augment(part["image"], batch_rng(self.seed, list(rows)))
        return self.processor(images=images, do_resize=False, do_center_crop=False,
                              return_tensors="pt")["pixel_values"]

    def training(self, rows: list[int], epoch: int) -> torch.Tensor:
        """Pixels of training examples `rows` in `epoch`: each image augmented by its own
        (seed, epoch, index) generator, so a batch is the same in any worker, rank or resumed run."""
        if self.augment is None:
            return self[torch.as_tensor(rows, dtype=torch.long)]
        images = self.augment(self.ds.select(rows)["image"], example_rngs(self.seed, epoch, rows))
        return self.processor(images=images, do_resize=False, do_center_crop=False,
                              return_tensors="pt")["pixel_values"]


def train_pixels(x: torch.Tensor | LazyPixels, rows: list[int], epoch: int) -> torch.Tensor:
    """Training pixels of `rows` from an eager tensor (taken as is) or a `LazyPixels` (processed now)."""
    if isinstance(x, LazyPixels):
        return x.training(rows, epoch)
    return x[torch.as_tensor(rows, dtype=torch.long)]


def labels(ds: Dataset) -> torch.Tensor:
    return torch.as_tensor(np.asarray(ds["label"]), dtype=torch.long)


def prepare_images(pair: SplitPair, processor: object, lazy: bool = False, augment: Augment | None = None,
                   seed: int = 0, eval_split: str = "test") -> tuple[Any, ...]:
    """(train_x, train_y, eval_x, eval_y) of one dataset, eval_* being `eval_split` (test or validation);
    x are tensors, or `LazyPixels` when `lazy` (only lazy training splits are augmented: the tiny suite's
    eager tensors are used as they are)."""
    scored = pair.scored(eval_split)
    if not lazy:
        return (pixel_values(pair.train, processor), labels(pair.train),
                pixel_values(scored, processor), labels(scored))
    return (LazyPixels(pair.train, processor, augment, seed), labels(pair.train),
            LazyPixels(scored, processor), labels(scored))
