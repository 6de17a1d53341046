"""Pure statistics on the tidy frame of `analysis.load`: seed aggregation, Pareto fronts, baseline ratios.

Every function takes a DataFrame and returns a new one (never mutates), so the same numbers feed the
figures, the markdown tables and the tests.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd

from analysis.load import PANEL_KEYS, SETTING_KEYS

log = logging.getLogger(__name__)

Direction = Literal["min", "max"]

#: Method kinds, as results record them (`run.method_kind`, from runners.engine.adapt.method_info):
#: analysis never lists method names; which methods exist, what they are called and whether they are
#: adapters comes from the `method_kind` / `method_label` columns of `analysis.load.load_results`.
ADAPTER, REFERENCE = "adapter", "reference"
#: The baseline every cost is shown relative to, and that budgets are named after ("lora8"): the one place
#: analysis names a method.
BASELINE = "lora"
METHOD_COLUMNS = ("method_kind", "method_label")

# Two-sided 95% Student-t quantiles for 1..30 degrees of freedom; beyond that the normal value.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042]


def t_critical(n: int) -> float:
    """Two-sided 95% t quantile for a mean of `n` samples (NaN for n < 2: no interval from one seed)."""
    if n < 2:
        return math.nan
    return _T975[n - 2] if n - 1 <= len(_T975) else 1.960


def successful(df: pd.DataFrame) -> pd.DataFrame:
    """Only runs that finished: failed runs stay in the frame for reporting but never enter a mean."""
    return df[df["status"] == "success"]


def method_info(df: pd.DataFrame) -> pd.DataFrame:
    """One row per method of the frame (index `method`): its `method_kind` and `method_label` (the name
    itself where a label is missing)."""
    missing = [c for c in ("method", *METHOD_COLUMNS) if c not in df.columns]
    if missing:
        raise ValueError(f"results frame has no {', '.join(missing)} column(s): load results with "
                         "analysis.load.load_results, which reads them from each record's run section")
    info = df.drop_duplicates("method").set_index("method")[list(METHOD_COLUMNS)]
    return info.assign(method_label=info["method_label"].fillna(pd.Series(info.index, index=info.index)))


def is_adapter(df: pd.DataFrame) -> pd.Series:
    """Rows of adapter methods (the budgeted structures), as opposed to reference points."""
    method_info(df)
    return df["method_kind"] == ADAPTER


def method_order(df: pd.DataFrame) -> list[str]:
    """Methods of the frame in display order: adapters (the baseline first, then by label), then the
    reference points (by label). Stable whatever order the runs were loaded in."""
    info = method_info(df)
    return sorted(info.index, key=lambda m: (info.at[m, "method_kind"] != ADAPTER, m != BASELINE,
                                             str(info.at[m, "method_label"]), m))


def per_run(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run (drops the per-dataset columns); run-level metrics are `mean_accuracy` etc."""
    cols = [c for c in df.columns if c not in ("dataset", "accuracy", "accuracy_before")]
    return df.drop_duplicates("source")[cols].reset_index(drop=True)


def aggregate_seeds(df: pd.DataFrame, metrics: Sequence[str],
                    keys: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean, std, count and 95% CI half-width of each metric over seeds, failed runs excluded.

    Default keys are the configuration columns (`SETTING_KEYS`, plus `dataset` if present), so rows that
    differ only in seed are pooled. Output columns: keys, `n_runs`, `<metric>_{mean,std,count,ci95}`.
    """
    keys = list(keys) if keys is not None else _default_keys(df)
    ok = successful(df)
    if ok.empty:
        return pd.DataFrame(columns=[*keys, "n_runs"])
    grouped = ok.groupby(keys, dropna=False, sort=False)
    out = grouped["source"].nunique().rename("n_runs").to_frame()
    for m in metrics:
        values = grouped[m]
        stats = pd.DataFrame({f"{m}_mean": values.mean(), f"{m}_std": values.std(ddof=1),
                              f"{m}_count": values.count()})
        stats[f"{m}_ci95"] = [t_critical(int(n)) * s / math.sqrt(n) if n > 1 else math.nan
                              for n, s in zip(stats[f"{m}_count"], stats[f"{m}_std"], strict=True)]
        out = out.join(stats)
    out = _with_method_info(out.reset_index(), df)
    return _sorted(out)


def pareto_mask(df: pd.DataFrame, x: str, y: str, x_dir: Direction = "min",
                y_dir: Direction = "max") -> pd.Series:
    """True for rows no other row dominates (at least as good on both metrics, better on one).

    Rows with a missing value are never on the front.
    """
    for d in (x_dir, y_dir):
        if d not in ("min", "max"):
            raise ValueError(f"direction must be 'min' or 'max', got {d!r}")
    xs = df[x].to_numpy(dtype=float) * (1 if x_dir == "min" else -1)
    ys = df[y].to_numpy(dtype=float) * (1 if y_dir == "min" else -1)
    valid = ~(np.isnan(xs) | np.isnan(ys))
    mask = np.zeros(len(df), dtype=bool)
    for i in np.flatnonzero(valid):
        no_worse = valid & (xs <= xs[i]) & (ys <= ys[i])
        better = (xs < xs[i]) | (ys < ys[i])
        mask[i] = not np.any(no_worse & better)
    return pd.Series(mask, index=df.index, name="pareto")


def pareto_front(df: pd.DataFrame, x: str, y: str, x_dir: Direction = "min",
                 y_dir: Direction = "max") -> pd.DataFrame:
    """The non-dominated rows, sorted along `x` (ready to draw as a line)."""
    return df[pareto_mask(df, x, y, x_dir, y_dir)].sort_values(x)


def normalise_to_lora(df: pd.DataFrame, metrics: Sequence[str], keys: Sequence[str] | None = None,
                      reference: str = BASELINE) -> pd.DataFrame:
    """Add `<metric>_rel` = value / mean of the `reference` method's value at the same budget.

    Keys default to the panel plus `budget_target`, and `device_type` where the frame has it (a cost is
    only ever divided by the baseline's on the same kind of device); rows with no baseline run at their
    budget (references, an un-matched budget, another device) get NaN. Applied to per-run rows, then
    aggregated, it gives a CI on the ratio.
    """
    if keys is None:
        keys = [*PANEL_KEYS, "budget_target", *(["device_type"] if "device_type" in df.columns else [])]
    keys = list(keys)
    ok = successful(df) if "status" in df.columns else df
    ref = (ok[ok["method"] == reference].groupby(keys, dropna=False)[list(metrics)].mean()
           .rename(columns=lambda m: f"{m}__ref"))
    out = df.join(ref, on=keys)
    for m in metrics:
        out[f"{m}_rel"] = out[m] / out.pop(f"{m}__ref")
    return out


def memory_column(df: pd.DataFrame) -> str | None:
    """The peak-memory column to plot: GPU `peak_mem_bytes` if any run has it, else CPU `peak_rss_bytes`.

    The two measure different things, so a figure shows one of them only; rows without it are dropped.
    """
    for col in ("peak_mem_bytes", "peak_rss_bytes"):
        if col in df.columns and df[col].notna().any():
            other = "peak_rss_bytes" if col == "peak_mem_bytes" else "peak_mem_bytes"
            if other in df.columns and df[other].notna().any():
                log.warning("runs mix GPU and CPU memory measurements; showing %s only", col)
            return col
    return None


def per_dataset_table(df: pd.DataFrame) -> pd.DataFrame:
    """Seed-mean accuracy as a (method, budget_target) x dataset table, with a `mean` column;
    `table.attrs["adapters"]` lists its adapter methods (for `best_adapter_mask`)."""
    agg = aggregate_seeds(df, ["accuracy"], [*_method_keys(df), "dataset"])
    if agg.empty:
        return pd.DataFrame()
    table = agg.pivot_table(index=["method", "budget_target"], columns="dataset", values="accuracy_mean",
                            dropna=False, sort=False)
    table = table.dropna(how="all")
    table = table[sorted(table.columns)]
    table["mean"] = table.mean(axis=1)
    ranks = {m: i for i, m in enumerate(method_order(df))}
    table = table.loc[sorted(table.index, key=lambda ix: (ranks[ix[0]], _budget_sort(ix[1])))]
    table.attrs["adapters"] = [m for m in ranks if method_info(df).at[m, "method_kind"] == ADAPTER]
    return table


def best_adapter_mask(table: pd.DataFrame) -> np.ndarray:
    """Boolean mask over `per_dataset_table`: the best adapter(s) of each column, ties all marked.

    Reference points are excluded: full fine-tuning usually wins, which would hide the comparison.
    """
    values = table.to_numpy(dtype=float)
    adapters = table.attrs.get("adapters")
    if adapters is None:
        raise ValueError("best_adapter_mask needs a table from per_dataset_table (it lists the adapters)")
    adapter_rows = np.array([m in adapters for m, _ in table.index], dtype=bool)[:, None]
    masked = np.where(adapter_rows & ~np.isnan(values), values, -np.inf)
    best = masked.max(axis=0, initial=-np.inf)
    return np.isfinite(masked) & np.isclose(masked, best[None, :])


def panels(df: pd.DataFrame) -> list[tuple[tuple, pd.DataFrame]]:
    """Split the frame into comparison panels (task, size, model, regime), in a stable order."""
    return [(key if isinstance(key, tuple) else (key,), part)
            for key, part in df.groupby(PANEL_KEYS, dropna=False, sort=True)]


# ------------------------------------------------------------------------------------ helpers


def _default_keys(df: pd.DataFrame) -> list[str]:
    keys = [k for k in SETTING_KEYS if k in df.columns]
    return [*keys, "dataset"] if "dataset" in df.columns else keys


def _method_keys(df: pd.DataFrame) -> list[str]:
    return [k for k in SETTING_KEYS if k in df.columns]


def _budget_sort(budget: object) -> float:
    return math.inf if budget is None or pd.isna(budget) else float(budget)


def _with_method_info(agg: pd.DataFrame, df: pd.DataFrame) -> pd.DataFrame:
    """The aggregate with each method's kind and label (constant per method) joined back on."""
    if "method" not in agg.columns or any(c not in df.columns for c in METHOD_COLUMNS):
        return agg
    return (agg.drop(columns=[c for c in METHOD_COLUMNS if c in agg.columns])
            .join(method_info(df), on="method"))


def _sorted(agg: pd.DataFrame) -> pd.DataFrame:
    if "method" not in agg.columns or "method_kind" not in agg.columns:
        return agg
    ranks = {m: i for i, m in enumerate(method_order(agg))}
    order = agg["method"].map(ranks)
    budget = agg["budget_target"].map(_budget_sort) if "budget_target" in agg.columns else 0
    return (agg.assign(_m=order, _b=budget).sort_values(["_m", "_b"], kind="stable")
            .drop(columns=["_m", "_b"]).reset_index(drop=True))
