"""Training-time image augmentation of the paper image suites, on PIL images (no torchvision needed).

The official RandLoRA code trains every image dataset with RandomResizedCrop(224, scale=(0.5, 1.0),
bicubic) followed by a random horizontal flip (github.com/PaulAlbert31/RandLoRA,
vision_language/src/finetune.py, the `preprocess_train` transform). `random_resized_crop` follows the
sampling rule torchvision documents for RandomResizedCrop: up to 10 draws of an area fraction in `scale`
and a log-uniform aspect ratio in (3/4, 4/3), else a centre crop of the clamped ratio.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

RATIO = (3 / 4, 4 / 3)  # torchvision RandomResizedCrop's default aspect-ratio range


@dataclass(frozen=True)
class Augment:
    """Random resized crop to `size` (area fraction in `scale`) + horizontal flip with prob. `flip`."""

    size: int
    scale: tuple[float, float] = (0.5, 1.0)
    flip: float = 0.5

    def __call__(self, images: Sequence[Image.Image],
                 rng: np.random.Generator | Sequence[np.random.Generator]) -> list[Image.Image]:
        """Augment `images` with one generator for all, or one per image (`example_rngs`)."""
        rngs = rng if isinstance(rng, Sequence) else [rng] * len(images)
        out = []
        for img, r in zip(images, rngs, strict=True):
            img = random_resized_crop(img.convert("RGB"), self.size, self.scale, r)
            out.append(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if r.random() < self.flip else img)
        return out


def example_rngs(seed: int, epoch: int, indices: Sequence[int]) -> list[np.random.Generator]:
    """One generator per example, fixed by (seed, epoch, example index): an image's crop depends on
    nothing else, neither on which batch, worker process or DDP rank it lands in, nor on a resume, and
    it changes from epoch to epoch. No state needs checkpointing."""
    return [np.random.default_rng([seed % 2**63, epoch, int(i)]) for i in indices]


def batch_rng(seed: int, indices: Sequence[int]) -> np.random.Generator:
    """A generator fixed by the run seed and the batch's example indices (one generator for a batch;
    training uses `example_rngs`, which does not depend on how examples are grouped)."""
    return np.random.default_rng([seed, zlib.crc32(np.asarray(indices, dtype=np.int64).tobytes())])


def crop_box(width: int, height: int, scale: tuple[float, float], rng: np.random.Generator
             ) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop covering a `scale` fraction of the image area."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    ratio = width / height  # fallback: the largest centred crop whose ratio lies in RATIO
    if ratio < RATIO[0]:  # too tall: full width
        w, h = width, round(width / RATIO[0])
    elif ratio > RATIO[1]:  # too wide: full height
        w, h = round(height * RATIO[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def random_resized_crop(img: Image.Image, size: int, scale: tuple[float, float],
                        rng: np.random.Generator) -> Image.Image:
    return img.resize((size, size), Image.Resampling.BICUBIC, box=crop_box(*img.size, scale, rng))


def from_config(cfg: object, processor: object) -> Augment | None:
    """`task.data.augment` ({size, scale, flip}; null = none) as an Augment; size null = the
    processor's crop size (224 for the CLIP and DINOv2 checkpoints)."""
    if not cfg:
        return None
    size = cfg.size or (getattr(processor, "crop_size", None) or {}).get("height")
    if not size:
        raise ValueError("task.data.augment.size is null and the image processor has no crop_size; set it")
    return Augment(int(size), tuple(float(s) for s in cfg.scale),
                   float(cfg.flip))
