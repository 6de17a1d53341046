"""The RandLoRA paper's published numbers (analysis/paper/*.yaml) beside ours, per dataset and for the mean.

Each file holds tables of one paper: a table names its source (the paper's table), the task / size / data
regime it matches, its datasets, and rows `{method, r, label, values: {dataset: percent}, mean}`. A row whose
`values` is null has not been transcribed: the report prints the row with "n/a" and says so. Optional keys are
data for readers and tests, not printed: a table's `decimals` (the places the paper prints), a row's `params`
and `std` (as the paper prints them). Our side of a row
is the seed mean of the successful runs of that task, size and regime with the same method and `hp.r` (as
+sweep=paper runs them); the difference is ours minus the paper's, in points, and the mean is taken over the
datasets both sides have.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

PAPER_DIR = Path(__file__).resolve().parent / "paper"
TABLE_KEYS = ("name", "source", "task", "size", "regime", "datasets", "rows")


def load_tables(folder: Path = PAPER_DIR) -> list[dict[str, Any]]:
    """Every table of every analysis/paper/*.yaml, each with its file's `paper` and its own keys checked."""
    tables = []
    for path in sorted(folder.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text()) or {}
        for table in doc.get("tables") or []:
            missing = [k for k in TABLE_KEYS if k not in table]
            if missing:
                raise ValueError(f"{path.name}: table {table.get('name', '?')!r} lacks {', '.join(missing)}")
            tables.append({**table, "paper": doc.get("paper"), "file": path.name})
    return tables


def _rank(hp: str) -> Any:
    return json.loads(hp or "{}").get("r")


def ours(df: pd.DataFrame, table: dict[str, Any], row: dict[str, Any]) -> dict[str, float]:
    """Seed-mean accuracy (percent) per dataset of our runs matching `row` in `table`'s panel."""
    ok = df[(df["status"] == "success") & (df["task"] == table["task"]) & (df["size"] == table["size"])
            & (df["regime"] == table["regime"]) & (df["method"] == row["method"])]
    if row.get("r") is not None:
        ok = ok[ok["hp"].map(_rank) == row["r"]]
    means = ok.groupby("dataset")["accuracy"].mean()
    return {d: 100 * float(means[d]) for d in table["datasets"] if d in means.index}


def comparison(df: pd.DataFrame, table: dict[str, Any]) -> pd.DataFrame:
    """One line per (row, side): paper, ours and ours - paper per dataset, plus `mean` over shared
    datasets."""
    lines = []
    for row in table["rows"]:
        paper = {d: float(v) for d, v in (row.get("values") or {}).items() if v is not None}
        mine = ours(df, table, row)
        shared = [d for d in table["datasets"] if d in paper and d in mine]
        diff = {d: mine[d] - paper[d] for d in shared}
        label = row.get("label") or f"{row['method']}-{row.get('r')}"
        for side, values in (("paper", paper), ("ours", mine), ("ours - paper", diff)):
            mean = _mean(values, shared) if side != "paper" or row.get("mean") is None else float(row["mean"])
            lines.append({"row": label, "side": side, **{d: values.get(d) for d in table["datasets"]},
                          "mean": mean if side != "ours - paper" else _mean(diff, shared)})
    return pd.DataFrame(lines)


def _mean(values: dict[str, float], shared: list[str]) -> float | None:
    picked = [values[d] for d in shared if d in values]
    return sum(picked) / len(picked) if picked else None


def relevant(df: pd.DataFrame, tables: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The tables whose task, size and regime some successful run of `df` has."""
    ok = df[df["status"] == "success"]
    panels = set(zip(ok["task"], ok["size"], ok["regime"], strict=True))
    return [t for t in tables if (t["task"], t["size"], t["regime"]) in panels]
