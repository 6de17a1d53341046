"""Labels checked before anything is built on them: in [0, classes), named as the prompts name them.

A copy whose integer labels start at 1 is shifted by its source's `label_offset`; an off-by-one, a names
list of the wrong length or names in another order is one clear error, here or in
runners/sweeps/launch_check.py (what `python -m runners.preflight` prints).
"""
from __future__ import annotations

import numpy as np
from datasets import Dataset
from omegaconf import DictConfig

from tasks.prompts import name_keys


def shift_labels(ds: Dataset | None, src: DictConfig) -> Dataset | None:
    """The source's label column plus its `label_offset` (e.g. -1 for a copy whose integer labels are
    1-based), so every task reads labels in [0, num_classes). On a split as loaded (no index mapping) only the
    label column is replaced; images are not rewritten."""
    offset, column = int(src.label_offset or 0), src.label_column or "label"
    if ds is None or offset == 0:
        return ds
    shifted = (np.asarray(ds[column], dtype=np.int64) + offset).tolist()
    return ds.remove_columns(column).add_column(column, shifted)


def check_labels(name: str, src: DictConfig, classes: list[str], splits: dict[str, Dataset | None]) -> None:
    """Every split's labels in [0, len(classes)) and, with a `name_column`, named as the prompts name them:
    one clear ValueError otherwise, before anything is built on them."""
    for split, ds in splits.items():
        check_label_range(name, split, ds, len(classes))
        check_label_names(name, split, ds, classes, src.name_column)


def check_label_range(name: str, split: str, ds: Dataset | None, num_classes: int) -> None:
    """One clear error for a label outside [0, num_classes): an off-by-one or a names list of the wrong
    length would otherwise be an index error on the accelerator, or prompts silently shifted by one.
    Regression targets (no class names) are not checked."""
    if ds is None or num_classes == 0 or len(ds) == 0:
        return
    ys = np.asarray(ds["label"])
    problem = label_range_problem(name, split, int(ys.min()), int(ys.max()), num_classes)
    if problem:
        raise ValueError(problem)


def check_label_names(name: str, split: str, ds: Dataset | None, classes: list[str],
                      column: str | None) -> None:
    """One clear error when a copy's own row names contradict the prompts' class names
    (`label_names_problem`)."""
    if ds is None or not column or not classes or len(ds) == 0:
        return
    pairs = list(zip(np.asarray(ds["label"]).tolist(), ds[column], strict=True))
    problem = label_names_problem(name, split, pairs, classes, column)
    if problem:
        raise ValueError(problem)


def label_range_problem(name: str, split: str, low: int, high: int, num_classes: int) -> str | None:
    """The one-line problem of labels spanning low..high with `num_classes` class names, or None if they fit
    [0, num_classes); shared by the run (check_label_range) and runners/sweeps/launch_check.py."""
    if low >= 0 and high < num_classes:
        return None
    where = (f"dataset {name!r}, split {split!r}: label {low if low < 0 else high} "
             f"is outside [0, {num_classes}) "
             f"(labels span {low}..{high}, {num_classes} class names)")
    if low < 0:  # -1 marks an unlabelled example (GLUE's hidden test labels)
        return (f"{where}; negative labels mark unlabelled examples: "
                f"point task.data.sources.{name}.train_split "
                "/ test_split / val_split at a labelled split")
    offset = f"={-low} (labels start at {low})" if low > 0 else ""
    return (f"{where}; set task.data.sources.{name}.label_offset{offset} "
            f"or task.data.sources.{name}.classes=[...] "
            "naming every label in order")


def label_names_problem(name: str, split: str, pairs: list[tuple[int, str]], classes: list[str],
                        column: str) -> str | None:
    """The one-line problem of a copy whose rows name their class (`name_column`, e.g. Caltech-256's `text`)
    when most labels' prompt names disagree with those row names -- labels shifted (a missing
    `label_offset`) or a names list in another order -- or None. Half of the distinct labels, not all,
    must agree: row names may be spelled apart from the official ones (`bonsai-101`, `bonsai`)."""
    seen = dict(sorted(set(pairs)))
    wrong = [(y, n) for y, n in seen.items() if 0 <= y < len(classes)
             and not set(name_keys(classes[y])) & set(name_keys(str(n)))]
    if 2 * len(wrong) <= len(seen):
        return None
    y, row_name = wrong[0]
    return (f"dataset {name!r}, split {split!r}: {len(wrong)} of {len(seen)} labels disagree with their "
            f"{column!r} names (label {y} is named {row_name!r} but prompted as {classes[y]!r}): "
            f"the labels are "
            f"shifted or the names are in another order; set task.data.sources.{name}.label_offset or "
            f"task.data.sources.{name}.classes=[...] in label order")
