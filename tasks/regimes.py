"""Data regimes of the paper suites: k-shot (1, 2, 4, 16 per class) and a fraction (50%, 100%) of train.

The subset depends on the run seed (each seed sees a different draw, as in the RandLoRA few-shot
protocol) and on nothing else, so it is reproducible. The chosen indices are cached as JSON next to the
dataset fingerprint: a sweep over methods at one seed reuses exactly the same examples, and a cluster
re-run does not re-scan a large label column.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
from datasets import Dataset
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def regime_name(shots: int | None, fraction: float | None) -> str:
    """`16shot`, `frac0.5` or `full`: what the run trained on (also the cache key)."""
    if shots:
        return f"{int(shots)}shot"
    if fraction is not None and float(fraction) < 1.0:
        return f"frac{float(fraction):g}"
    return "full"


def sample_indices(labels: np.ndarray, shots: int | None, fraction: float | None, seed: int) -> np.ndarray:
    """Sorted train indices of the regime: `shots` per class (all of a smaller class), or a random
    `fraction` of the split stratified by class, or everything."""
    n = len(labels)
    if not shots and (fraction is None or float(fraction) >= 1.0):
        return np.arange(n)
    if (shots is not None and int(shots) <= 0) or (fraction is not None and not 0.0 < float(fraction) <= 1.0):
        raise ValueError(f"invalid data regime shots={shots} fraction={fraction}: shots is a positive int "
                         "(1, 2, 4, 16), fraction is in (0, 1]")
    rng = np.random.default_rng(seed)
    keep = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        take = int(shots) if shots else max(1, math.floor(float(fraction) * len(members)))
        keep.append(rng.permutation(members)[: min(take, len(members))])
    return np.sort(np.concatenate(keep))


def apply_regime(name: str, train: Dataset, data_cfg: DictConfig) -> Dataset:
    """The train split restricted to `task.data.shots` / `task.data.fraction` (cached per seed)."""
    shots, fraction = data_cfg.shots, data_cfg.fraction
    regime = regime_name(shots, fraction)
    if regime == "full":
        return train
    seed = int(data_cfg.sample_seed or 0)
    path = _cache_path(data_cfg, name, train, regime, seed)
    if path is not None and path.is_file():
        idx = np.asarray(json.loads(path.read_text())["indices"], dtype=np.int64)
    else:
        idx = sample_indices(np.asarray(train["label"]), shots, fraction, seed)
        if path is not None:
            _write_atomic(path, {"dataset": name, "regime": regime, "seed": seed, "indices": idx.tolist()})
    log.info("%s: %s regime, %d of %d train examples (seed %d)", name, regime, len(idx), len(train), seed)
    return train.select(idx.tolist())


def _cache_path(data_cfg: DictConfig, name: str, train: Dataset, regime: str, seed: int) -> Path | None:
    root = data_cfg.cache_dir
    if not root:
        return None  # caching disabled (cache_dir: null)
    fingerprint = getattr(train, "_fingerprint", None) or f"n{len(train)}"
    return Path(os.path.expanduser(str(root))) / f"{name}-{fingerprint}-{regime}-s{seed}.json"


def _write_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)


def steps_for_epochs(train_sizes: dict[str, int], epochs: dict[str, float], examples_per_step: int,
                     min_steps_per_epoch: int = 0) -> int:
    """Optimizer steps that give every dataset its epochs: sum over datasets of
    epochs * max(min_steps_per_epoch, ceil(n / examples_per_step)).

    `min_steps_per_epoch` is the RandLoRA few-shot rule: tiny k-shot sets are over-sampled so one
    epoch is at least 10 iterations (vision_language/src/finetune.py of the official code)."""
    total = 0
    for name, n in train_sizes.items():
        per_epoch = max(int(min_steps_per_epoch), math.ceil(n / examples_per_step))
        total += math.ceil(float(epochs[name]) * per_epoch)
    return max(1, total)
