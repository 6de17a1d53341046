"""`report/index.html`: a leaderboard of every configuration that opens from disk, with no server or network.

Researchers compare hundreds of runs by filtering, sorting and plotting the two metrics that matter to
them. The page is one file: the runs are embedded as JSON, the JavaScript and CSS are inlined from their
sources in `analysis/assets/` (leaderboard.html, .css, .js), and the report's figures are linked by relative
path (they sit beside it). The Python side decides what each
column *is* (a configuration key, a metric and its better direction, or a per-run detail); the browser
only aggregates seeds, filters, sorts, draws and exports. Method names come from the data, never from here.

URL hash parameters set the initial state, so a view can be shared and tested without a browser driver:
``index.html#view=runs&filter=lora&task=clip&sort=-accuracy&x=trainable&y=accuracy``.
"""
from __future__ import annotations

import html
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

#: Columns that describe one run, not its configuration: never grouped on, never averaged.
RUN_COLUMNS = ("run_id", "seed", "status", "error", "source", "command", "started_at", "finished_at")
#: Numeric columns that are part of a configuration (what was chosen), not a measurement.
CONFIG_NUMERIC = ("budget", "budget_target", "lr")
#: Columns offered as selects above the table (those present in the data); `device_type` names the GPU model.
FILTER_COLUMNS = ("task", "dataset", "regime", "device", "device_type")
#: Points are coloured by this column; the legend shows `method_label` where the data has it.
COLOUR_COLUMN, LABEL_COLUMN = "method", "method_label"
#: The scatter opens on the first of these present (cost on x, quality on y).
DEFAULT_X = ("trainable", "trainable_params")
DEFAULT_Y = ("accuracy", "mean_accuracy")

#: Better direction of a metric from its name; first match wins, no match means "no direction".
_DIRECTIONS: list[tuple[str, str | None]] = [
    (r"budget_error", None),  # signed relative error: neither larger nor smaller is better
    (r"(^|_)(dw|delta)_|rank", None),  # rank of the update describes it; it is not a goal
    (r"acc|samples_per_s|throughput|gain|score|f1", "max"),
    (r"time|_s$|bytes|mem|rss|params|trainable|total|loss|forgetting|error|cost", "min"),
]


def metric_direction(name: str) -> str | None:
    """'max' (higher is better, e.g. accuracy), 'min' (cost, memory, parameters) or None (no order)."""
    for pattern, direction in _DIRECTIONS:
        if re.search(pattern, name.lower()):
            return direction
    return None


def column_roles(runs: pd.DataFrame) -> dict[str, str]:
    """Each column's role: 'run' (per-run detail), 'key' (identifies a configuration) or 'metric'
    (averaged)."""
    roles = {}
    for col in runs.columns:
        numeric = pd.api.types.is_numeric_dtype(runs[col]) and not pd.api.types.is_bool_dtype(runs[col])
        if col in RUN_COLUMNS:
            roles[col] = "run"
        else:
            roles[col] = "metric" if numeric and col not in CONFIG_NUMERIC else "key"
    return roles


def leaderboard_data(runs: pd.DataFrame, figures: Sequence[Path] = (), out: Path | None = None,
                     captions: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The JSON the page reads: columns with role and direction, one object per run, filters, figures."""
    if runs.empty:
        raise ValueError("the runs table is empty; the leaderboard needs at least one run")
    if COLOUR_COLUMN not in runs.columns:
        raise ValueError(f"the runs table needs a {COLOUR_COLUMN!r} column; "
                         f"it has: {', '.join(runs.columns)}")
    roles = column_roles(runs)
    metrics = [c for c, r in roles.items() if r == "metric"]
    columns = [{"name": c, "role": roles[c],
                "direction": metric_direction(c) if roles[c] == "metric" else None} for c in runs.columns]
    return {
        "columns": columns,
        "rows": [{c: _plain(v) for c, v in zip(runs.columns, row, strict=True)}
                 for row in runs.itertuples(index=False)],
        "filters": [c for c in FILTER_COLUMNS if c in runs.columns],
        "colour": COLOUR_COLUMN,
        "label": LABEL_COLUMN if LABEL_COLUMN in runs.columns else COLOUR_COLUMN,
        "status": "status" if "status" in runs.columns else None,
        "axes": {"x": _first(DEFAULT_X, metrics, 0), "y": _first(DEFAULT_Y, metrics, 1)},
        "figures": [_figure(Path(f), out, captions or {}) for f in figures],
    }


def embed_json(data: Any) -> str:
    """JSON safe inside <script>: '<', '>' and '&' as unicode escapes, so no value can close the tag."""
    text = json.dumps(data, allow_nan=False, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def write_leaderboard(runs: pd.DataFrame, out: Path, figures: list[Path],
                      captions: Mapping[str, str] | None = None,
                      title: str = "rankbench leaderboard") -> Path:
    """Write `out/index.html` (one self-contained page) and return its path."""
    out = Path(out)
    data = leaderboard_data(runs, figures, out, captions)
    out.mkdir(parents=True, exist_ok=True)
    parts = {"title": html.escape(title), "css": _asset("leaderboard.css"), "data": embed_json(data),
             "js": _asset("leaderboard.js")}
    template = _asset("leaderboard.html")
    # one pass: a value that contains a placeholder is never expanded again
    page = re.sub(r"\{(title|css|data|js)\}", lambda m: parts[m.group(1)], template)
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


# -------------------------------------------------------------------------------------- helpers


def _plain(value: Any) -> Any:
    """A JSON cell: missing and non-finite numbers become null, numpy scalars Python ones, containers their
    JSON text and anything else its str(), so every cell is a value the table can show and sort."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if isinstance(value, (str, int, float, bool)) else str(value)


def _first(preferred: Sequence[str], metrics: list[str], fallback: int) -> str | None:
    for name in preferred:
        if name in metrics:
            return name
    return metrics[min(fallback, len(metrics) - 1)] if metrics else None


def _figure(path: Path, out: Path | None, captions: Mapping[str, str]) -> dict[str, str]:
    src = os.path.relpath(path, out) if out is not None else path.name
    return {"src": Path(src).as_posix(), "caption": captions.get(path.name, path.stem.replace("_", " "))}



def _asset(name: str) -> str:
    """One of the page's source files (analysis/assets/, shipped as package data)."""
    return resources.files("analysis").joinpath("assets", name).read_text(encoding="utf-8")
