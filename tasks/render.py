"""Procedural 32x32 RGB images: coloured shapes, textures and scenes, rendered with numpy.

Everything is a pure function of a `numpy.random.Generator`, so the same seed always gives the same
pixels. Shapes are drawn at 2x resolution and averaged down for soft, anti-aliased edges; the tiny CLIP
is pretrained on these renderings (`runners.pretrain`) and several downstream datasets reuse them.
"""
from __future__ import annotations

import numpy as np

SIZE = 32
_SS = 2  # supersampling factor

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 220, 40),
    "purple": (150, 50, 200),
    "orange": (245, 140, 20),
    "white": (235, 235, 235),
    "cyan": (40, 210, 220),
}
SHAPES = ["circle", "square", "triangle", "diamond", "ring", "cross", "heart", "star"]
SIZES = {"small": (4.0, 6.0), "large": (8.5, 11.5)}
POSITIONS = {
    "on the left": (9.5, 16.0),
    "on the right": (22.5, 16.0),
    "at the top": (16.0, 9.5),
    "at the bottom": (16.0, 22.5),
    "in the center": (16.0, 16.0),
}


def _grid() -> tuple[np.ndarray, np.ndarray]:
    n = SIZE * _SS
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    return (x + 0.5) / _SS, (y + 0.5) / _SS


_GX, _GY = _grid()


def shape_mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Soft coverage mask (SIZE x SIZE, values in [0, 1]) of `shape` centred at (cx, cy), radius r."""
    dx, dy = (_GX - cx) / r, (_GY - cy) / r
    dist = np.sqrt(dx**2 + dy**2)
    if shape == "circle":
        m = dist <= 1.0
    elif shape == "square":
        m = np.maximum(abs(dx), abs(dy)) <= 0.85
    elif shape == "triangle":
        m = (dy <= 0.8) & (abs(dx) <= (dy + 1.0) * 0.62)
    elif shape == "diamond":
        m = abs(dx) + abs(dy) <= 1.0
    elif shape == "ring":
        m = (dist <= 1.0) & (dist >= 0.55)
    elif shape == "cross":
        m = ((abs(dx) <= 0.3) & (abs(dy) <= 1.0)) | ((abs(dy) <= 0.3) & (abs(dx) <= 1.0))
    elif shape == "heart":
        hx, hy = dx * 1.15, -dy * 1.15 + 0.15
        m = (hx**2 + hy**2 - 1.0) ** 3 - hx**2 * hy**3 <= 0.0
    elif shape == "star":
        theta = np.arctan2(dy, dx) + np.pi / 2
        m = dist <= 0.45 + 0.55 * np.abs(np.cos(2.5 * theta)) ** 2
    else:
        raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")
    return downsample(m.astype(np.float32))


def downsample(hi: np.ndarray) -> np.ndarray:
    """Average _SS x _SS blocks: the supersampled mask becomes anti-aliased coverage."""
    return hi.reshape(SIZE, _SS, SIZE, _SS).mean(axis=(1, 3))


def background(rng: np.random.Generator) -> np.ndarray:
    """A dark, slightly tinted, noisy canvas (float32 HxWx3 in [0, 255])."""
    base = rng.uniform(0, 60, size=3).astype(np.float32)
    noise = rng.normal(0, 6, size=(SIZE, SIZE, 3)).astype(np.float32)
    return np.clip(base + noise, 0, 255)


def jitter_color(rgb: tuple[int, int, int], rng: np.random.Generator, amount: float = 18.0) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.normal(0, amount, size=3), 0, 255).astype(np.float32)


def paint(canvas: np.ndarray, mask: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """Alpha-blend a solid colour through a coverage mask."""
    return canvas * (1.0 - mask[..., None]) + rgb[None, None, :] * mask[..., None]


def render_object(
    rng: np.random.Generator, shape: str, color: str, size: str, position: str | None
) -> np.ndarray:
    """One object on a noisy background; position None places it anywhere it fits."""
    r = rng.uniform(*SIZES[size])
    if position is None:
        cx, cy = rng.uniform(r, SIZE - r, size=2)
    else:
        cx, cy = np.asarray(POSITIONS[position]) + rng.uniform(-1.5, 1.5, size=2)
    img = paint(background(rng), shape_mask(shape, cx, cy, r), jitter_color(COLORS[color], rng))
    return to_uint8(img)


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def caption(rng: np.random.Generator, shape: str, color: str, size: str,
            position: str) -> tuple[str, dict[str, str]]:
    """A caption naming a random subset of the attributes (so each one is grounded on its own), and
    that subset, which tells the contrastive loss which other images the caption also describes."""
    said: dict[str, str] = {}
    if rng.random() < 0.5:
        said["size"] = size
    if rng.random() < 0.7:
        said["color"] = color
    if rng.random() < 0.8:
        said["shape"] = shape
    text = " ".join([*said.values()] + ([] if "shape" in said else ["shape"]))
    if rng.random() < 0.4:
        said["position"] = position
        text += " " + position
    prefix = ["a photo of a", "a", "an image of a"][rng.integers(3)]
    return f"{prefix} {text}" + ("." if rng.random() < 0.5 else ""), said


def sample_scene(rng: np.random.Generator) -> tuple[np.ndarray, dict[str, str]]:
    """One pretraining image (a rendered object) and its attributes."""
    attrs = {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "color": list(COLORS)[rng.integers(len(COLORS))],
        "size": list(SIZES)[rng.integers(len(SIZES))],
        "position": list(POSITIONS)[rng.integers(len(POSITIONS))],
    }
    return render_object(rng, **attrs), attrs


def caption_words() -> list[str]:
    """Every word the pretraining captions can contain (the core of the tiny CLIP's vocabulary)."""
    words = ["a", "photo", "of", "an", "image", "shape", "."]
    words += list(SIZES) + list(COLORS) + SHAPES
    for pos in POSITIONS:
        words += pos.split()
    return list(dict.fromkeys(words))
