"""Paired comparisons between methods: the statistic a reviewer asks for.

Runs of two methods at the same seed share their data subset and head initialisation, so the honest
comparison is the mean of per-seed differences, not two independent means. For every pair of adapter
methods at every budget (per dataset, and over a suite's mean) this gives the mean paired difference of
accuracy with a 95% Student-t interval; an interval containing 0 is a tie. The noise floor beside it is
the seed-to-seed standard deviation of each configuration, and the binomial standard error of accuracy on
test sets of the recorded size (`metrics.eval_examples`): a difference below either is not evidence.
"""
from __future__ import annotations

import itertools
import json
import math

import pandas as pd

from analysis.aggregate import is_adapter, method_order, successful, t_critical
from analysis.load import PANEL_KEYS

PAIRED_COLUMNS = [*PANEL_KEYS, "dataset", "budget", "method_a", "method_b", "mean_diff", "ci_low", "ci_high",
                  "n"]
SUITE = "(suite mean)"


def paired_differences(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (panel, dataset or suite mean, budget, method pair): a minus b over shared seeds."""
    values = _per_seed_values(df)
    rows = []
    for key, part in values.groupby([*PANEL_KEYS, "dataset", "budget_target"], dropna=False, sort=True):
        wide = part.pivot_table(index="seed", columns="method", values="value", aggfunc="mean")
        methods = [m for m in method_order(df) if m in wide.columns]
        for a, b in itertools.combinations(methods, 2):
            diff = (wide[a] - wide[b]).dropna()
            rows.append([*key, a, b, *_interval(diff.tolist())])
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)


def win_tie_loss(paired: pd.DataFrame) -> pd.DataFrame:
    """Per method pair, over budgets and panels (suite means only): wins of a (interval above 0),
    ties (interval contains 0, or fewer than 2 seeds) and losses."""
    suite = paired[paired["dataset"] == SUITE]
    out = []
    for (a, b), part in suite.groupby(["method_a", "method_b"], sort=False):
        win = int((part["ci_low"] > 0).sum())
        loss = int((part["ci_high"] < 0).sum())
        out.append({"method_a": a, "method_b": b, "win": win, "tie": len(part) - win - loss, "loss": loss})
    return pd.DataFrame(out, columns=["method_a", "method_b", "win", "tie", "loss"])


def noise_floor(df: pd.DataFrame) -> pd.DataFrame:
    """Seed-to-seed standard deviation of the suite-mean accuracy, per panel: median and max over
    configurations with at least two seeds; beside it the median binomial standard error of a run's
    suite mean (NaN where no run recorded its test-set sizes)."""
    values = _per_seed_values(df)
    std = _seed_std(values[values["dataset"] == SUITE], PANEL_KEYS)
    if std.empty:
        return pd.DataFrame(columns=[*PANEL_KEYS, "seed_std_median", "seed_std_max", "binomial_se_median",
                                     "configurations"])
    grouped = std.groupby(level=list(range(len(PANEL_KEYS))), dropna=False)
    runs = _binomial_rows(df)
    runs["var"] = runs["p"] * (1 - runs["p"]) / runs["n"]
    per_run = runs.groupby([*PANEL_KEYS, "source"], dropna=False)["var"].agg(["sum", "count"])
    per_run["se"] = per_run["sum"] ** 0.5 / per_run["count"]  # SE of a mean of independent test sets
    out = pd.DataFrame({"seed_std_median": grouped.median(), "seed_std_max": grouped.max(),
                        "configurations": grouped.count()})
    binomial = per_run.groupby(level=list(range(len(PANEL_KEYS))), dropna=False)["se"].median()
    out.insert(2, "binomial_se_median", binomial.reindex(out.index))
    return out.reset_index()


def per_test_set_noise(df: pd.DataFrame) -> pd.DataFrame:
    """Per panel and dataset: examples scored, the median accuracy of adapter runs and the binomial
    standard error sqrt(p(1-p)/n) at it (what one run's accuracy varies by from the finite test set
    alone), beside the median seed-to-seed standard deviation of that dataset's configurations."""
    columns = [*PANEL_KEYS, "dataset", "eval_examples", "accuracy_median", "binomial_se", "seed_std_median"]
    runs = _binomial_rows(df)
    if runs.empty:
        return pd.DataFrame(columns=columns)
    keys = [*PANEL_KEYS, "dataset"]
    out = runs.groupby(keys, dropna=False).agg(eval_examples=("n", "median"), accuracy_median=("p", "median"))
    out["binomial_se"] = [binomial_se(p, n)
                          for p, n in zip(out["accuracy_median"], out["eval_examples"], strict=True)]
    values = _per_seed_values(df)
    std = _seed_std(values[values["dataset"] != SUITE], keys)
    out["seed_std_median"] = (std.groupby(level=list(range(len(keys))), dropna=False).median()
                              .reindex(out.index))
    return out.reset_index()[columns]


def binomial_se(accuracy: float, n: float) -> float:
    """Standard error of an accuracy measured on n independent examples."""
    return math.sqrt(accuracy * (1 - accuracy) / n)


def _seed_std(values: pd.DataFrame, keys: list[str]) -> pd.Series:
    """Seed-to-seed standard deviation of each configuration (keys, method, budget) with two seeds or more."""
    return values.groupby([*keys, "method", "budget_target"], dropna=False)["value"].std(ddof=1).dropna()


def _binomial_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Successful adapter runs' (panel, source, dataset, accuracy p, examples n) where the run recorded n
    and the dataset has an accuracy (GLUE's STS-B, a regression, has none)."""
    ok = successful(df)
    ok = ok[is_adapter(ok)]
    rows = pd.DataFrame({**{k: ok[k] for k in [*PANEL_KEYS, "source", "dataset"]},
                         "p": [_accuracy(m) for m in ok["dataset_metrics"]],
                         "n": pd.to_numeric(ok["eval_examples"], errors="coerce")}).dropna(subset=["p", "n"])
    return rows[rows["n"] > 0]


def _accuracy(dataset_metrics: str | None) -> float:
    """The accuracy among a dataset's metrics (load.py stores them as JSON); NaN without one."""
    value = json.loads(dataset_metrics).get("accuracy") if isinstance(dataset_metrics, str) else None
    return float(value) if isinstance(value, (int, float)) else math.nan


def _per_seed_values(df: pd.DataFrame) -> pd.DataFrame:
    """Adapter runs with a budget: accuracy per (panel, dataset, budget, method, seed), plus the suite
    mean."""
    ok = successful(df)
    ok = ok[is_adapter(ok) & ok["budget_target"].notna() & ok["seed"].notna()]
    keys = [*PANEL_KEYS, "budget_target", "method", "seed"]
    per_dataset = ok[[*keys, "dataset", "accuracy"]].rename(columns={"accuracy": "value"})
    suite = ok.drop_duplicates("source")[[*keys, "mean_accuracy"]].rename(columns={"mean_accuracy": "value"})
    suite["dataset"] = SUITE
    both = pd.concat([per_dataset, suite], ignore_index=True)
    return both.groupby([*keys, "dataset"], dropna=False, as_index=False)["value"].mean()


def _interval(diffs: list[float]) -> tuple[float, float, float, int]:
    """(mean, ci_low, ci_high, n) of paired differences; the interval is NaN below two seeds."""
    n = len(diffs)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = sum(diffs) / n
    if n < 2:
        return mean, math.nan, math.nan, n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t_critical(n) * sd / math.sqrt(n)
    return mean, mean - half, mean + half, n
