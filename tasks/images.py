"""The embedded image datasets: generated deterministically, 32x32 RGB, each with class names + prompt.

They mirror the paper suites in miniature. `shapes` and `colors` are what the tiny CLIP was pretrained
on (zero-shot works); `digits` (real handwriting, sklearn), `textures` and `counts` (a composition the
captions never mention) are new to it (zero-shot near chance), so adaptation has something to buy.
"""
from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from datasets import Array3D, ClassLabel, Dataset, Features

from tasks import render

Generator = Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class ImageSpec:
    """A generated dataset: its class names, CLIP prompt template and pixel generator."""

    name: str
    classes: list[str]
    template: str
    make: Generator | None  # None: real data with a fixed split (see make_split)


def _shapes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(len(render.SHAPES), size=n)
    colors, sizes = list(render.COLORS), list(render.SIZES)
    imgs = [
        render.render_object(
            rng, render.SHAPES[y], colors[rng.integers(len(colors))], sizes[rng.integers(2)], None
        )
        for y in labels
    ]
    return np.stack(imgs), labels


def _colors(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    colors, sizes = list(render.COLORS), list(render.SIZES)
    labels = rng.integers(len(colors), size=n)
    imgs = [
        render.render_object(
            rng, render.SHAPES[rng.integers(len(render.SHAPES))], colors[y], sizes[rng.integers(2)], None
        )
        for y in labels
    ]
    return np.stack(imgs), labels


TEXTURES = ["horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard", "dots", "grid"]


def texture_mask(kind: str, period: float, phase: np.ndarray) -> np.ndarray:
    """Foreground coverage of a periodic pattern (SIZE x SIZE in [0, 1])."""
    x, y = render._GX + phase[0], render._GY + phase[1]
    u, v = (x / period) % 1.0, (y / period) % 1.0
    if kind == "horizontal stripes":
        m = v < 0.5
    elif kind == "vertical stripes":
        m = u < 0.5
    elif kind == "diagonal stripes":
        m = ((x + y) / period) % 1.0 < 0.5
    elif kind == "checkerboard":
        m = (u < 0.5) ^ (v < 0.5)
    elif kind == "dots":
        m = (u - 0.5) ** 2 + (v - 0.5) ** 2 < 0.09
    elif kind == "grid":
        m = (u < 0.22) | (v < 0.22)
    else:
        raise ValueError(f"unknown texture {kind!r}")
    return render.downsample(m.astype(np.float32))


def _textures(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(len(TEXTURES), size=n)
    palette = list(render.COLORS.values())
    imgs = []
    for y in labels:
        period = rng.uniform(4.0, 9.0)
        fg = render.jitter_color(palette[rng.integers(len(palette))], rng)
        mask = texture_mask(TEXTURES[y], period, rng.uniform(0, period, size=2))
        imgs.append(render.to_uint8(render.paint(render.background(rng), mask, fg)))
    return np.stack(imgs), labels


COUNTS = ["one", "two", "three", "four"]


def _counts(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(len(COUNTS), size=n)
    return np.stack([_count_scene(rng, int(y) + 1) for y in labels]), labels


def _count_scene(rng: np.random.Generator, k: int) -> np.ndarray:
    """k small objects at non-overlapping places (rejection sampling, fixed number of draws)."""
    img, centers = render.background(rng), []
    palette = list(render.COLORS.values())
    while len(centers) < k:
        c = rng.uniform(5.0, 27.0, size=2)
        if all(np.hypot(*(c - o)) > 10.0 for o in centers):
            centers.append(c)
    for cx, cy in centers:
        shape = render.SHAPES[rng.integers(len(render.SHAPES))]
        color = render.jitter_color(palette[rng.integers(len(palette))], rng)
        img = render.paint(img, render.shape_mask(shape, cx, cy, rng.uniform(3.5, 4.5)), color)
    return render.to_uint8(img)


DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@functools.lru_cache(maxsize=1)
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's bundled handwritten digits (1797 real 8x8 scans), upscaled bilinearly to 32x32 RGB."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(render.SIZE, render.SIZE), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).squeeze(1).numpy()
    return np.repeat(x[..., None], 3, axis=-1), d.target.astype(np.int64)


def _digits_split(split: str, n: int, seed: int, n_test: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """A fixed seeded train/test partition of the 1797 digits (train gets at most 1297)."""
    x, y = digits_arrays()
    perm = np.random.default_rng([seed, zlib.crc32(b"digits")]).permutation(len(y))
    idx = perm[n_test:][:n] if split == "train" else perm[:n_test][:n]
    return x[idx], y[idx]


SPECS: dict[str, ImageSpec] = {
    s.name: s
    for s in [
        ImageSpec("shapes", list(render.SHAPES), "a photo of a {}.", _shapes),
        ImageSpec("colors", list(render.COLORS), "a photo of a {} shape.", _colors),
        ImageSpec("digits", DIGITS, "a photo of the number {}.", None),
        ImageSpec("textures", TEXTURES, "a photo of a {} pattern.", _textures),
        ImageSpec("counts", COUNTS, "a photo of {} shapes.", _counts),
    ]
}


def features(classes: list[str]) -> Features:
    return Features({"image": Array3D((render.SIZE, render.SIZE, 3), "uint8"),
                     "label": ClassLabel(names=classes)})


def split_rng(seed: int, name: str, split: str) -> np.random.Generator:
    """Independent stream per (seed, dataset, split): adding a dataset never changes another one."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), zlib.crc32(split.encode())])


@functools.lru_cache(maxsize=64)
def make_split(name: str, split: str, n: int, seed: int = 0) -> Dataset:
    """Generate split 'train' or 'test' of dataset `name` (n examples; digits: a fixed real split).

    Cached in the process: deterministic, and a suite renders every dataset once per run for its own
    training and again for the forgetting probes of the others (a `Dataset` is never changed in place)."""
    if name not in SPECS:
        raise ValueError(f"unknown image dataset {name!r}; valid: {', '.join(SPECS)}")
    spec = SPECS[name]
    if spec.make is None:
        x, y = _digits_split(split, n, seed)
    else:
        x, y = spec.make(split_rng(seed, name, split), n)
    return Dataset.from_dict({"image": x, "label": y.astype(np.int64)}, features=features(spec.classes))


def image_words() -> list[str]:
    """Words of every image dataset's class names and templates (part of the tiny CLIP vocabulary)."""
    words: list[str] = []
    for s in SPECS.values():
        words += s.template.replace("{}", " ").replace(".", " ").split()
        for c in s.classes:
            words += c.split()
    return list(dict.fromkeys(words))
