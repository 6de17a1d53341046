"""Paper figures: pure functions from the tidy frame of one comparison panel to a matplotlib Figure.

Methods come from the data (`method_kind`, `method_label` columns), never from a list here: `method_styles`
gives each method of a panel its label, colour, marker and line style from fixed cycles in display order
(`analysis.aggregate.method_order`), so every figure of a panel draws a method identically and a new
method appears in every figure with no edit.
Figures are sized for a paper column (3.5 in) with 7-8 pt text, built on `matplotlib.figure.Figure`
directly with an Agg canvas (no pyplot global state, nothing to close), so callers save or discard them
freely.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import Formatter, Locator, NullFormatter

from analysis.aggregate import (
    ADAPTER,
    BASELINE,
    SETTING_KEYS,
    aggregate_seeds,
    best_adapter_mask,
    is_adapter,
    memory_column,
    method_info,
    method_order,
    normalise_to_lora,
    pareto_mask,
    per_dataset_table,
    per_run,
)
from analysis.load import PANEL_KEYS

log = logging.getLogger(__name__)

COLUMN_WIDTH_IN = 3.5
#: Okabe-Ito colour-blind-safe palette (black left out), assigned to adapters in display order.
ADAPTER_COLORS = ["#0072b2", "#e69f00", "#009e73", "#d55e00", "#cc79a7", "#56b4e9", "#f0e442"]
ADAPTER_MARKERS = ["o", "s", "^", "D", "v", "P", "h"]
#: Reference points (full fine-tuning, head only, ...): greys, drawn as lines where they have no budget.
REFERENCE_COLORS = ["#333333", "#999999", "#666666"]
REFERENCE_MARKERS = ["*", "X", "P"]
REFERENCE_LINES = ["--", ":", "-."]
STYLE = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7,
         "xtick.labelsize": 7, "ytick.labelsize": 7, "lines.linewidth": 1.3, "lines.markersize": 4.5,
         "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
         "grid.linewidth": 0.5, "legend.frameon": False, "errorbar.capsize": 2, "svg.fonttype": "none"}
#: The rank figure's y axis (% of the layer's maximum rank), a little room above 100%.
RANK_LIMITS = (0.0, 105.0)
_MEMORY_LABELS = {"peak_mem_bytes": "peak GPU memory", "peak_rss_bytes": "peak RSS growth (CPU)"}


# ------------------------------------------------------------------------------------ styling


@dataclass(frozen=True)
class MethodStyle:
    """How every figure draws one method."""

    label: str
    kind: str
    color: str
    marker: str
    linestyle: str

    def mark(self) -> dict[str, str]:
        """matplotlib keywords for a point or line of this method (colour, marker, legend label)."""
        return {"color": self.color, "marker": self.marker, "label": self.label}


def method_styles(df: pd.DataFrame) -> dict[str, MethodStyle]:
    """Method -> style for the methods of `df`: adapters and references each take the next entry of
    their cycles in display order (LoRA, the baseline, first: the same colours as before for the four
    original adapters)."""
    info, styles, counts = method_info(df), {}, {True: 0, False: 0}
    for method in method_order(df):
        adapter = info.at[method, "method_kind"] == ADAPTER
        i = counts[adapter]
        counts[adapter] += 1
        colors, markers = ((ADAPTER_COLORS, ADAPTER_MARKERS) if adapter
                           else (REFERENCE_COLORS, REFERENCE_MARKERS))
        styles[method] = MethodStyle(str(info.at[method, "method_label"]),
                                     str(info.at[method, "method_kind"]),
                                     colors[i % len(colors)], markers[i % len(markers)],
                                     "-" if adapter else REFERENCE_LINES[i % len(REFERENCE_LINES)])
    return styles


def label(df: pd.DataFrame, method: str) -> str:
    """What figures and tables call `method` (its recorded `method_label`)."""
    return str(method_info(df).at[method, "method_label"])


def panel_title(df: pd.DataFrame) -> str:
    """'task · model (size) · regime' for the single panel in `df`."""
    return panel_label(*_single_panel(df))


def panel_label(task: str, size: str, model: str, regime: str) -> str:
    """How figures and tables name a panel (PANEL_KEYS' values, in their order)."""
    return f"{task} · {model} ({size}) · {regime}"


def human(x: float, _pos: object = None, digits: int = 3) -> str:
    """18432 -> '18.4k', 5.6e6 -> '5.6M': tick labels a reader parses at a glance (`digits` significant)."""
    if x is None or not np.isfinite(x):
        return ""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.{digits}g}{suffix}"
    return f"{x:.{digits}g}"


class DistinctHumanFormatter(Formatter):
    """`human` labels with as many significant digits as it takes for no two ticks to read the same."""

    def __call__(self, x: float, pos: object = None) -> str:
        return human(x)

    def format_ticks(self, values: Sequence[float]) -> list[str]:
        for digits in range(3, 8):
            labels = [human(v, digits=digits) for v in values]
            if len(set(labels)) == len(labels):
                return labels
        return labels


class ParamsLocator(Locator):
    """Log-axis ticks at `subs` x 10^k inside the view; where fewer than two fall inside (one budget, whose
    methods' counts differ by a fraction of a percent), one tick at the roundest value inside the view.
    matplotlib's LogLocator falls back to linear ticks there, which print as '115k 115k 115k'."""

    def __init__(self, subs: Sequence[float]) -> None:
        self.subs = tuple(subs)

    def __call__(self) -> list[float]:
        vmin, vmax = self.axis.get_view_interval()
        return self.tick_values(vmin, vmax)

    def tick_values(self, vmin: float, vmax: float) -> list[float]:
        lo, hi = sorted((vmin, vmax))
        if not (np.isfinite(lo) and np.isfinite(hi) and lo > 0):
            return []
        decades = range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
        ticks = [s * 10.0**e for e in decades for s in self.subs if lo <= s * 10.0**e <= hi]
        return ticks if len(ticks) >= 2 else [roundest_inside(lo, hi)]


def roundest_inside(lo: float, hi: float) -> float:
    """The value in [lo, hi] with the fewest significant digits, nearest the (geometric) centre."""
    centre = float(np.sqrt(lo * hi))
    for digits in range(1, 16):
        step = 10.0 ** (np.floor(np.log10(centre)) - digits + 1)
        value = round(centre / step) * step
        if lo <= value <= hi:
            return float(value)
    return centre


def _figure(width: float = COLUMN_WIDTH_IN, height: float = 2.6) -> Figure:
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # Agg canvas on this figure only: no global backend switch, no pyplot registry
    return fig


def _log_params_axis(ax: Axes) -> None:
    """Log x with plain '20k' labels that never repeat; denser ticks when the data span less than ~1.5
    decades, one tick when they span a few percent (a single budget)."""
    ax.set_xscale("log")
    lo, hi = ax.dataLim.intervalx
    narrow = np.isfinite(lo) and lo > 0 and hi / lo < 30
    ax.xaxis.set_major_locator(ParamsLocator((1.0, 2.0, 3.0, 5.0) if narrow else (1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(DistinctHumanFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("trainable parameters (log scale)")


def _legend_below(fig: Figure, ax: Axes, ncol: int = 3) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(ncol, len(handles)),
                   handlelength=1.6, columnspacing=1.0)


def _errs(values: pd.Series) -> np.ndarray | None:
    """Error-bar half-widths, or None when no point has more than one seed."""
    arr = values.to_numpy(dtype=float)
    return None if np.all(np.isnan(arr)) else np.nan_to_num(arr)


# --------------------------------------------------------------------------------- figure 1


def fig_accuracy_vs_params(df: pd.DataFrame) -> Figure:
    """Accuracy vs trainable parameters: one line per adapter, reference points as horizontal lines.

    Accuracy is the run's mean over its datasets; error bars are 95% Student-t intervals over seeds, cut at
    the axis (an arrowhead marks a cut end) and named in the legend with their seed count.
    """
    with matplotlib.rc_context(STYLE):
        fig = _figure(height=2.9)
        ax = fig.add_subplot()
        agg = _run_agg(df, ["mean_accuracy", "trainable_params"])
        if not is_adapter(agg).any():
            raise ValueError("no successful adapter runs to plot against parameters")
        styles, off = method_styles(agg), _off_budget(df)
        limits, cut = _limits_around_means(100 * agg["mean_accuracy_mean"]), 0
        for method, part in _by_method(agg[is_adapter(agg)]):
            part = _best_per_budget(part, "mean_accuracy_mean").sort_values("trainable_params_mean")
            cut += _interval_errorbar(ax, part["trainable_params_mean"], 100 * part["mean_accuracy_mean"],
                                      _pct(_errs(part["mean_accuracy_ci95"])), limits, styles[method])
            missed = part[[(method, b) in off for b in part["budget_target"]]]
            if not missed.empty:  # drawn hollow, on a white face: never read as a point at the budget
                ax.plot(missed["trainable_params_mean"], 100 * missed["mean_accuracy_mean"], linestyle="none",
                        marker=styles[method].marker, markerfacecolor="white",
                        markeredgecolor=styles[method].color,
                        markersize=7, zorder=5, label=f"{styles[method].label}: budget not reached (>1% off)")
        for method, part in _by_method(agg[~is_adapter(agg)]):
            _reference_line(ax, part, "mean_accuracy", styles[method])
        _log_params_axis(ax)
        ax.set_ylim(*limits)
        _interval_note(ax, agg, "mean_accuracy", cut)
        ax.set_ylabel(_accuracy_label(df))
        ax.set_title(f"Accuracy vs parameters\n{panel_title(df)}")
        _legend_below(fig, ax)
    return fig


def _off_budget(df: pd.DataFrame) -> set[tuple[str, Any]]:
    """(method, budget_target) of settings with a run whose solved count missed the budget by more than the
    solver's tolerance (`params.budget_reached` false: the structure's counts step over it)."""
    runs = per_run(df)
    if "budget_reached" not in runs:
        return set()
    missed = runs[runs["budget_reached"].eq(False)]
    return set(zip(missed["method"], missed["budget_target"], strict=True))


def _limits_around_means(means_pct: pd.Series) -> tuple[float, float]:
    """The accuracy axis around the means (within 0-100%): with 2-3 seeds a 95% CI can span far
    beyond the possible range, and an axis stretched to it flattens every difference between methods."""
    lo, hi = float(np.nanmin(means_pct)), float(np.nanmax(means_pct))
    pad = max(5.0, 0.25 * (hi - lo))
    return max(0.0, lo - pad), min(100.0, hi + pad)


def _interval_errorbar(ax: Axes, xs: pd.Series, ys: pd.Series, errs: np.ndarray | None,
                       limits: tuple[float, float], style: MethodStyle) -> int:
    """Points with error bars cut at the y limits, an arrowhead on each cut end (so a bar wider than the
    axis never hides the point or reads as its interval's end); returns how many ends were cut."""
    if errs is None:
        ax.errorbar(xs, ys, **style.mark())
        return 0
    y, lo, hi = ys.to_numpy(float), limits[0], limits[1]
    low, high = y - errs < lo, y + errs > hi
    yerr = np.vstack([np.where(low, y - lo, errs), np.where(high, hi - y, errs)]).clip(min=0)
    ax.errorbar(xs, ys, yerr=yerr, **style.mark())
    x = xs.to_numpy(float)
    for mask, edge, marker in ((low, lo, "v"), (high, hi, "^")):
        if mask.any():
            ax.plot(x[mask], np.full(mask.sum(), edge), linestyle="none", marker=marker, color=style.color,
                    markersize=4, clip_on=False, zorder=6, label="_cut")
    return int(low.sum() + high.sum())


def _interval_note(ax: Axes, agg: pd.DataFrame, metric: str, cut: int) -> None:
    """Name the bars in the legend (95% t-interval, the seed counts behind them) and the cut ends, if any."""
    counts = agg.loc[agg[f"{metric}_ci95"].notna(), f"{metric}_count"].astype(int)
    if counts.empty:
        return
    n = f"{counts.min()}" if counts.min() == counts.max() else f"{counts.min()}-{counts.max()}"
    ax.plot([], [], color="0.45", marker="|", markersize=7, linestyle="none",
            label=f"95% t-interval (n={n})")
    if cut:
        ax.plot([], [], color="0.45", marker="^", markersize=4, linestyle="none",
                label="cut at the axis")


def _reference_line(ax: Axes, ref: pd.DataFrame, metric: str, style: MethodStyle) -> None:
    row = ref.iloc[0]
    mean, ci = 100 * row[f"{metric}_mean"], 100 * row[f"{metric}_ci95"]
    params = row.get("trainable_params_mean")
    extra = f" ({human(params)} params)" if params is not None and pd.notna(params) else ""
    ax.axhline(mean, color=style.color, linestyle=style.linestyle, linewidth=1.1, label=style.label + extra)
    if pd.notna(ci):
        ax.axhspan(mean - ci, mean + ci, color=style.color, alpha=0.12, linewidth=0)


# --------------------------------------------------------------------------------- figure 2


def fig_memory_pareto(df: pd.DataFrame) -> Figure:
    """Peak memory vs accuracy for every method and budget, with the Pareto front (less memory, more
    accuracy)."""
    mem = memory_column(df)
    if mem is None:
        raise ValueError("no peak_mem_bytes or peak_rss_bytes in these runs")
    with matplotlib.rc_context(STYLE):
        fig = _figure(height=2.9)
        ax = fig.add_subplot()
        agg = _run_agg(df.dropna(subset=[mem]), ["mean_accuracy", mem])
        scale, unit = _byte_unit(agg[f"{mem}_mean"].max())
        agg = agg.assign(_x=agg[f"{mem}_mean"] / scale, _xe=agg[f"{mem}_ci95"] / scale,
                         _y=100 * agg["mean_accuracy_mean"], _ye=100 * agg["mean_accuracy_ci95"])
        sizes, styles = _budget_marker_sizes(agg), method_styles(agg)
        for method, part in _by_method(agg):
            ax.errorbar(part["_x"], part["_y"], xerr=_errs(part["_xe"]), yerr=_errs(part["_ye"]),
                        color=styles[method].color, linestyle="none", elinewidth=0.7)
            ax.scatter(part["_x"], part["_y"], s=sizes[part.index], zorder=2, **styles[method].mark())
        if agg["budget_target"].nunique() > 1:
            ax.text(0.99, 0.02, "marker size ∝ budget", transform=ax.transAxes, ha="right", va="bottom",
                    fontsize=6.5, color="0.35")
        front = agg[pareto_mask(agg, "_x", "_y", "min", "max")].sort_values("_x")
        ax.plot(front["_x"], front["_y"], drawstyle="steps-post", color="black", linewidth=0.8,
                linestyle="--", zorder=1, label="Pareto front")
        ax.scatter(front["_x"], front["_y"], s=70, facecolors="none", edgecolors="black", linewidths=0.8,
                   zorder=3)
        ax.set_xlabel(f"{_MEMORY_LABELS.get(mem, mem)} ({unit})")
        ax.set_ylabel(_accuracy_label(df))
        ax.set_title(f"Memory vs accuracy (circled: Pareto-optimal)\n{panel_title(df)}")
        _legend_below(fig, ax, ncol=4)
    return fig


def _budget_marker_sizes(agg: pd.DataFrame) -> pd.Series:
    """Marker area grows with the budget rank so budgets of one method stay distinguishable."""
    budgets = sorted(agg["budget_target"].dropna().unique())
    area = {b: 14 + 16 * i for i, b in enumerate(budgets)}
    default = 14 + 8 * max(len(budgets) - 1, 0)
    return agg["budget_target"].map(lambda b: default if pd.isna(b) else area[b]).astype(float)


def _byte_unit(max_bytes: float) -> tuple[float, str]:
    if pd.notna(max_bytes) and max_bytes >= 4 * 2**30:
        return 2**30, "GiB"
    return 2**20, "MiB"


# --------------------------------------------------------------------------------- figure 3


def fig_cost_vs_lora(df: pd.DataFrame) -> Figure:
    """Step time and peak memory of each adapter relative to the baseline (`BASELINE`, LoRA) at the same
    budget (bars, 95% CI)."""
    mem = memory_column(df)
    metrics = [m for m in ("step_time_s", mem) if m is not None]
    runs = per_run(df)
    runs = runs[is_adapter(runs) & runs["budget_target"].notna()]
    if not (runs["method"] == BASELINE).any() or runs["method"].nunique() < 2:
        raise ValueError(f"needs the baseline ({BASELINE}) and at least one other adapter at a budget")
    rel = normalise_to_lora(runs, metrics)
    agg = aggregate_seeds(rel, [f"{m}_rel" for m in metrics], keys=SETTING_KEYS)
    budgets = sorted(agg["budget_target"].dropna().unique())
    styles = method_styles(agg)
    base = styles[BASELINE]
    with matplotlib.rc_context(STYLE):
        fig = _figure(height=1.45 * len(metrics) + 1.0)
        axes = fig.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
        for ax, metric in zip(axes, metrics, strict=True):
            _relative_bars(ax, agg, f"{metric}_rel", budgets, styles)
            name = "step time" if metric == "step_time_s" else _MEMORY_LABELS.get(metric, metric)
            ax.set_ylabel(f"{name}\n/ {base.label} (×)")
        axes[-1].set_xticks(range(len(budgets)), [_budget_label(b, runs, base.label) for b in budgets])
        axes[-1].set_xlabel("adapter budget (trainable parameters)")
        axes[0].set_title(f"Cost relative to {base.label} at equal budget\n{panel_title(df)}")
        _legend_below(fig, axes[0], ncol=4)
    return fig


def _relative_bars(ax: Axes, agg: pd.DataFrame, col: str, budgets: Sequence, styles: dict[str, MethodStyle]
                   ) -> None:
    width = 0.8 / max(len(styles), 1)
    for i, (method, style) in enumerate(styles.items()):
        part = agg[agg["method"] == method].set_index("budget_target").reindex(budgets)
        xs = np.arange(len(budgets)) + (i - (len(styles) - 1) / 2) * width
        ax.bar(xs, part[f"{col}_mean"], width=width * 0.92, color=style.color, label=style.label,
               yerr=_errs(part[f"{col}_ci95"]), error_kw={"elinewidth": 0.7, "capsize": 1.5})
    ax.axhline(1.0, color=styles[BASELINE].color, linewidth=0.8, linestyle="--", zorder=0)
    ax.grid(axis="x", visible=False)
    top = np.nanmax(agg[f"{col}_mean"] + agg[f"{col}_ci95"].fillna(0)) if len(agg) else 1.0
    ax.set_ylim(0, max(1.2, float(top) * 1.08))


def _budget_label(budget: float, runs: pd.DataFrame, base_label: str) -> str:
    """'37k\\n(LoRA r=8)': budgets are conventionally named by the baseline's (LoRA's) rank that produces
    them."""
    base = runs[(runs["method"] == BASELINE) & (runs["budget_target"] == budget)]
    rank = _lora_rank(base["hp"].iloc[0]) if len(base) else None
    return human(float(budget)) + (f"\n({base_label} r={rank})" if rank is not None else "")


def _lora_rank(hp_json: str) -> int | None:
    try:
        return json.loads(hp_json).get("r")
    except (TypeError, ValueError, AttributeError):
        return None


# --------------------------------------------------------------------------------- figure 4


def fig_per_dataset(df: pd.DataFrame, max_columns: int = 12) -> Figure:
    """Methods x datasets accuracy heatmap (seed means, %), best adapter per dataset in bold.

    Shading is per dataset (its min to max) because datasets differ in difficulty. Beyond `max_columns`
    datasets the table is transposed (datasets as rows) so a 22-dataset suite fits a page width.
    """
    table = per_dataset_table(df)
    if table.empty:
        raise ValueError("no successful runs to tabulate")
    values, bold = 100 * table.to_numpy(dtype=float), best_adapter_mask(table)
    shade = _column_minmax(values)
    styles = method_styles(df)
    methods = [m for m, _ in table.index]
    row_labels = [_row_label(styles[m].label, b) for m, b in table.index]
    datasets = [str(c) for c in table.columns]
    transpose = len(datasets) > max_columns
    if transpose:
        values, bold, shade = values.T, bold.T, shade.T
    n_rows, n_cols = values.shape
    with matplotlib.rc_context(STYLE):
        fig = _figure(width=max(COLUMN_WIDTH_IN, 1.4 + (0.42 if transpose else 0.5) * n_cols),
                      height=(1.6 if transpose else 1.1) + 0.2 * n_rows)
        ax = fig.add_subplot()
        ax.imshow(shade, cmap="Blues", vmin=0, vmax=1.4, aspect="auto", interpolation="nearest")
        for (r, c), v in np.ndenumerate(values):
            if not np.isnan(v):
                ax.text(c, r, f"{v:.1f}", ha="center", va="center", fontsize=6.5,
                        fontweight="bold" if bold[r, c] else "normal")
        method_axis = ax.xaxis if transpose else ax.yaxis
        _heatmap_ticks(ax, row_labels, datasets, transpose)
        for tick, method in zip(method_axis.get_ticklabels(), methods, strict=True):
            tick.set_color(styles[method].color)
        if datasets[-1] == "mean" and len(datasets) > 1:
            (ax.axhline if transpose else ax.axvline)(len(datasets) - 1.5, color="white", linewidth=3)
        ax.grid(False)
        ax.tick_params(length=0)
        for side in ("left", "bottom"):
            ax.spines[side].set_visible(False)
        ax.set_title(f"Per-dataset accuracy (%), best adapter per dataset in bold\n{panel_title(df)}")
    return fig


def _heatmap_ticks(ax: Axes, method_labels: list[str], datasets: list[str], transpose: bool) -> None:
    xs, ys = (method_labels, datasets) if transpose else (datasets, method_labels)
    ax.set_xticks(range(len(xs)), xs, rotation=40 if not transpose else 60, ha="right",
                  rotation_mode="anchor")
    ax.set_yticks(range(len(ys)), ys)


def _column_minmax(values: np.ndarray) -> np.ndarray:
    lo, hi = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return (values - lo) / span


def _row_label(name: str, budget: object) -> str:
    if budget is None or pd.isna(budget):
        return name
    return f"{name} @ {human(float(budget))}"


# --------------------------------------------------------------------------------- figure 5


def fig_delta_rank(df: pd.DataFrame) -> Figure:
    """Rank of dW as a fraction of the layer's maximum rank, per method and budget.

    Numerical rank (left) and effective rank (right): LoRA is capped at r, RandLoRA aims at full rank;
    reference points with a measurement (full fine-tuning) are horizontal lines.
    """
    runs = per_run(df).dropna(subset=["dw_rank_frac"])
    if not is_adapter(runs).any():
        raise ValueError("no delta_rank measurements of adapter runs")
    agg = aggregate_seeds(runs, ["dw_rank_frac", "dw_effective_rank_frac", "trainable_params"],
                          keys=SETTING_KEYS)
    styles = method_styles(agg)
    with matplotlib.rc_context(STYLE):
        fig = _figure(height=2.7)
        axes = fig.subplots(1, 2, sharey=True)
        cut = 0
        for ax, metric, name in zip(axes, ("dw_rank_frac", "dw_effective_rank_frac"),
                                    ("numerical rank", "effective rank"), strict=True):
            cut += _rank_panel(ax, agg, metric, styles)
            ax.set_title(name)
            _log_params_axis(ax)
            ax.set_xlabel("trainable params")
        axes[0].set_ylabel("rank(ΔW) / max rank (%)")
        axes[0].set_ylim(*RANK_LIMITS)
        _interval_note(axes[0], agg[is_adapter(agg)], "dw_rank_frac", cut)
        fig.suptitle(f"Rank of the weight update ΔW (mean over sampled layers)\n{panel_title(df)}",
                     fontsize=8)
        _legend_below(fig, axes[0])
    return fig


def _rank_panel(ax: Axes, agg: pd.DataFrame, metric: str, styles: dict[str, MethodStyle]) -> int:
    """One rank panel; returns how many interval ends were cut at the axis."""
    cut = 0
    for method, part in _by_method(agg[is_adapter(agg)]):
        part = part.sort_values("trainable_params_mean")
        cut += _interval_errorbar(ax, part["trainable_params_mean"], 100 * part[f"{metric}_mean"],
                                  _pct(_errs(part[f"{metric}_ci95"])), RANK_LIMITS, styles[method])
    for method, part in _by_method(agg[~is_adapter(agg)]):  # drawn on top: RandLoRA often sits exactly on it
        ax.axhline(100 * part[f"{metric}_mean"].iloc[0], color=styles[method].color, linestyle=(0, (3, 2)),
                   linewidth=0.9, label=styles[method].label, zorder=4)
    return cut


# ------------------------------------------------------------------------------------ helpers


def _single_panel(df: pd.DataFrame) -> tuple:
    keys = df[PANEL_KEYS].drop_duplicates()
    if len(keys) != 1:
        raise ValueError(f"a figure shows one panel (task, size, model, regime); got {len(keys)}: "
                         "split with analysis.aggregate.panels()")
    return tuple(keys.iloc[0])


def _run_agg(df: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    _single_panel(df)
    return aggregate_seeds(per_run(df), metrics, keys=SETTING_KEYS)


def _by_method(agg: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(method, its rows) in display order; none for an empty frame."""
    if agg.empty:
        return []
    parts = dict(tuple(agg.groupby("method", sort=False)))
    return [(m, parts[m]) for m in method_order(agg)]


def _best_per_budget(part: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One point per budget: if a sweep varied other knobs (e.g. lr), show the best setting."""
    if not part.duplicated(["budget_target"]).any():
        return part
    log.info("%s: several settings per budget; plotting the best by %s", part["method"].iloc[0], metric)
    return part.sort_values(metric, ascending=False).drop_duplicates(["budget_target"])


def _pct(err: np.ndarray | None) -> np.ndarray | None:
    return None if err is None else 100 * err


def _accuracy_label(df: pd.DataFrame) -> str:
    n = df.loc[df["status"] == "success", "dataset"].nunique()
    return f"mean accuracy over {n} datasets (%)" if n > 1 else "accuracy (%)"


# --------------------------------------------------------------------------------- forgetting

#: How `forgetting` reads per task (tasks/forgetting.py): CLIP's is zero-shot accuracy lost on the suite's
#: other datasets (a fraction, drawn in points); every other task's is a loss increase on held-out text.
_FORGETTING_AXES = {"clip": ("zero-shot accuracy lost on the other datasets (points)", 100.0)}
_LOSS_AXIS = ("loss increase on held-out generic text (nats)", 1.0)


def fig_forgetting(df: pd.DataFrame) -> Figure:
    """Accuracy gained (accuracy - accuracy before training) against forgetting, one point per method and
    budget: seed means with 95% CI error bars both ways. Up and left is better: gain without forgetting."""
    runs = per_run(df)
    if "forgetting" not in runs.columns or runs["forgetting"].isna().all():
        raise ValueError("no forgetting measurements (metrics.forgetting) in these runs")
    runs = runs.assign(accuracy_gain=_accuracy_gain(runs)).dropna(subset=["forgetting", "accuracy_gain"])
    _single_panel(df)
    agg = aggregate_seeds(runs, ["forgetting", "accuracy_gain"], keys=SETTING_KEYS)
    task, styles = str(agg["task"].iloc[0]), method_styles(agg)
    xlabel, xscale = _FORGETTING_AXES.get(task, _LOSS_AXIS)
    with matplotlib.rc_context(STYLE):
        fig = _figure(height=2.9)
        ax = fig.add_subplot()
        ax.axvline(0.0, color="#999999", linewidth=0.7)
        ax.axhline(0.0, color="#999999", linewidth=0.7)
        for method, part in _by_method(agg):
            part = _best_per_budget(part, "accuracy_gain_mean")
            xerr, yerr = _errs(part["forgetting_ci95"]), _pct(_errs(part["accuracy_gain_ci95"]))
            ax.errorbar(xscale * part["forgetting_mean"], 100 * part["accuracy_gain_mean"],
                        xerr=None if xerr is None else xscale * xerr, yerr=yerr, linestyle="none",
                        **styles[method].mark())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy gained by training (points)")
        ax.set_title(f"Accuracy gained vs forgetting\n{panel_title(df)}")
        _legend_below(fig, ax)
    return fig


def _accuracy_gain(runs: pd.DataFrame) -> pd.Series:
    """`accuracy_gain` where the frame has it, else mean accuracy after minus before training."""
    if "accuracy_gain" in runs.columns:
        return runs["accuracy_gain"]
    return runs["mean_accuracy"] - runs["mean_accuracy_before"]
