"""Evaluation metrics: top-1 accuracy and the eval loss from a classifier's logits (`classification`), and the
paper benchmarks' own (GLUE: each task's metric), pure functions of (predictions, labels) arrays named as
`task.data.sources.<name>.metrics` lists them.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F


def accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(pred == y))


def matthews_corr(pred: np.ndarray, y: np.ndarray) -> float:
    """CoLA's metric (the GLUE metric's `matthews_correlation`, sklearn's matthews_corrcoef)."""
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(y, pred))


def f1(pred: np.ndarray, y: np.ndarray) -> float:
    """MRPC's (and QQP's) metric: F1 of the positive class."""
    from sklearn.metrics import f1_score

    return float(f1_score(y, pred, zero_division=0.0))


def pearson(pred: np.ndarray, y: np.ndarray) -> float:
    """STS-B's metric (a regression task: `pred` are scores)."""
    if np.std(pred) == 0 or np.std(y) == 0:
        return 0.0  # an untrained constant predictor: correlation undefined, reported as 0
    return float(np.corrcoef(pred, y)[0, 1])


def spearman(pred: np.ndarray, y: np.ndarray) -> float:
    """Pearson r of the ranks (ties share their mean rank, as scipy.stats.spearmanr does)."""
    from scipy.stats import rankdata

    return pearson(rankdata(pred), rankdata(y))


def pearson_spearman_mean(pred: np.ndarray, y: np.ndarray) -> float:
    """STS-B's headline number in RandLoRA: run_glue.py's `combined_score`, the mean of the GLUE metric's
    values (pearson, spearmanr), which parse_results.py reports for stsb
    (github.com/PaulAlbert31/RandLoRA GLUE/run_glue.py:589-591, GLUE/parse_results.py:7-8)."""
    return (pearson(pred, y) + spearman(pred, y)) / 2


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy, "matthews_corr": matthews_corr, "f1": f1, "pearson": pearson, "spearman": spearman,
    "pearson_spearman_mean": pearson_spearman_mean}


def compute(names: list[str], pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """The named metrics of one dataset; an unknown name is a ValueError listing the valid ones."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; valid: {', '.join(METRICS)}")
    return {n: METRICS[n](pred, y) for n in names}


def classification(logits: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> dict[str, float]:
    """Top-1 `accuracy` (correct / n) and the mean cross-entropy `loss` of `scale * logits` (CLIP's
    temperature) on one dataset's eval split; the loss breaks ties between learning rates that score the
    same accuracy (runners/sweeps/sweeper.py choose_lr)."""
    logits = logits.float()
    return {"accuracy": logits.argmax(-1).eq(y).sum().item() / len(y),
            "loss": F.cross_entropy(scale * logits, y).item()}
