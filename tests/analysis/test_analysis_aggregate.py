"""Aggregation numbers, Pareto membership and LoRA normalisation on small hand-made frames."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis.aggregate import (
    BASELINE,
    aggregate_seeds,
    best_adapter_mask,
    is_adapter,
    method_order,
    normalise_to_lora,
    pareto_front,
    pareto_mask,
    per_dataset_table,
    per_run,
    t_critical,
)
from analysis.load import PANEL_KEYS

#: kind and label as records carry them (run.method_kind / run.method_label); analysis has no such list
KINDS = {"lora": ("adapter", "LoRA"), "loha": ("adapter", "LoHa"), "lokr": ("adapter", "LoKr"),
         "randlora": ("adapter", "RandLoRA"), "newmethod": ("adapter", "NewMethod"),
         "full": ("reference", "Full FT"), "none": ("reference", "Head-only")}


def _runs(rows: list[dict]) -> pd.DataFrame:
    base = {"task": "vision", "size": "tiny", "model": "m", "regime": "full data", "lr": 1e-3,
            "status": "success", "dataset": "d"}
    out = []
    for i, r in enumerate(rows):
        budget = r.get("budget_target")
        kind, label = KINDS[r["method"]]
        out.append(base | {"source": f"run{i}", "setting": f"budget={budget}", "method_kind": kind,
                           "method_label": label} | r)
    return pd.DataFrame(out)


def test_mean_std_count_ci():
    df = _runs([{"method": "lora", "budget_target": 10, "seed": s, "acc": a}
                for s, a in enumerate([0.5, 0.6, 0.7])])
    agg = aggregate_seeds(df, ["acc"])
    row = agg.iloc[0]
    assert row.acc_mean == pytest.approx(0.6) and row.acc_std == pytest.approx(0.1)
    assert row.acc_count == 3 and row.n_runs == 3
    assert row.acc_ci95 == pytest.approx(4.303 * 0.1 / math.sqrt(3))


def test_single_seed_has_no_interval():
    agg = aggregate_seeds(_runs([{"method": "lora", "budget_target": 10, "seed": 0, "acc": 0.5}]), ["acc"])
    assert agg.acc_count.iloc[0] == 1 and np.isnan(agg.acc_ci95.iloc[0]) and np.isnan(agg.acc_std.iloc[0])


def test_failed_runs_never_averaged_in():
    df = _runs([{"method": "lora", "budget_target": 10, "seed": 0, "acc": 0.8},
                {"method": "lora", "budget_target": 10, "seed": 1, "acc": 0.0, "status": "failed"}])
    agg = aggregate_seeds(df, ["acc"])
    assert agg.acc_mean.iloc[0] == pytest.approx(0.8) and agg.n_runs.iloc[0] == 1


def test_groups_separate_methods_budgets_and_refs_with_null_budget():
    df = _runs([{"method": m, "budget_target": b, "seed": s, "acc": 0.1 * s}
                for m, b in (("lora", 10), ("lora", 20), ("randlora", 10), ("full", None)) for s in (0, 1)])
    agg = aggregate_seeds(df, ["acc"])
    assert list(zip(agg.method, agg.budget_target.fillna(-1), strict=True)) == [
        ("lora", 10), ("lora", 20), ("randlora", 10), ("full", -1)]
    assert (agg.n_runs == 2).all()
    assert agg.method_kind.tolist() == ["adapter"] * 3 + ["reference"]   # carried through for figures
    assert agg.method_label.tolist() == ["LoRA", "LoRA", "RandLoRA", "Full FT"]


def test_method_order_comes_from_the_data_baseline_first_references_last():
    df = _runs([{"method": m, "budget_target": None if KINDS[m][0] == "reference" else 10, "seed": 0}
                for m in ("none", "randlora", "newmethod", "full", "loha", "lora")])
    assert BASELINE == "lora"
    assert method_order(df) == ["lora", "loha", "newmethod", "randlora", "full", "none"]
    assert method_order(df.iloc[::-1]) == method_order(df)   # not the load order
    assert is_adapter(df).tolist() == [False, True, True, False, True, True]
    with pytest.raises(ValueError, match="no method_kind, method_label column"):
        method_order(df.drop(columns=["method_kind", "method_label"]))


def test_t_critical():
    assert math.isnan(t_critical(1)) and t_critical(2) == pytest.approx(12.706)
    assert t_critical(31) == pytest.approx(2.042) and t_critical(500) == pytest.approx(1.96)


def test_pareto_membership_min_max():
    df = pd.DataFrame({"mem": [1, 2, 3, 2, 4, np.nan], "acc": [0.5, 0.7, 0.7, 0.6, 0.9, 1.0]},
                      index=list("abcdef"))
    mask = pareto_mask(df, "mem", "acc", "min", "max")
    # c ties b on accuracy with more memory; d is dominated by b; f has no memory value
    assert list(mask[mask].index) == ["a", "b", "e"]
    assert list(pareto_front(df, "mem", "acc").index) == ["a", "b", "e"]


def test_pareto_directions_and_duplicates():
    df = pd.DataFrame({"x": [1.0, 1.0, 2.0], "y": [5.0, 5.0, 1.0]})
    # a trade-off: none dominated
    assert pareto_mask(df, "x", "y", "min", "min").tolist() == [True, True, True]
    assert pareto_mask(df, "x", "y", "max", "max").tolist() == [True, True, True]
    # identical points are both kept
    assert pareto_mask(df, "x", "y", "min", "max").tolist() == [True, True, False]
    with pytest.raises(ValueError, match="direction"):
        pareto_mask(df, "x", "y", "low", "max")


def test_normalise_to_lora_at_same_budget():
    df = _runs([{"method": "lora", "budget_target": 10, "seed": 0, "t": 1.0},
                {"method": "lora", "budget_target": 10, "seed": 1, "t": 3.0},
                {"method": "lora", "budget_target": 20, "seed": 0, "t": 4.0},
                {"method": "randlora", "budget_target": 10, "seed": 0, "t": 3.0},
                {"method": "randlora", "budget_target": 20, "seed": 0, "t": 6.0},
                {"method": "loha", "budget_target": 30, "seed": 0, "t": 6.0},
                {"method": "full", "budget_target": None, "seed": 0, "t": 9.0},
                {"method": "lora", "budget_target": 10, "seed": 2, "t": 100.0, "status": "failed"}])
    rel = normalise_to_lora(df, ["t"]).set_index(["method", "budget_target", "seed"])["t_rel"]
    assert rel[("lora", 10, 0)] == pytest.approx(0.5) and rel[("lora", 10, 1)] == pytest.approx(1.5)
    assert rel[("randlora", 10, 0)] == pytest.approx(1.5) and rel[("randlora", 20, 0)] == pytest.approx(1.5)
    assert np.isnan(rel[("loha", 30, 0)])  # no LoRA at that budget
    assert df.columns.tolist() == normalise_to_lora(df, ["t"]).columns.tolist()[:-1]  # input untouched


def test_normalise_respects_panels():
    df = _runs([{"method": "lora", "budget_target": 10, "seed": 0, "t": 1.0},
                {"method": "lora", "budget_target": 10, "seed": 0, "t": 2.0, "task": "clip"},
                {"method": "lokr", "budget_target": 10, "seed": 0, "t": 4.0, "task": "clip"}])
    rel = normalise_to_lora(df, ["t"], keys=[*PANEL_KEYS, "budget_target"])
    assert rel.t_rel.tolist() == pytest.approx([1.0, 1.0, 2.0])


def test_per_run_and_per_dataset_table(sweep_df):
    clip = sweep_df[sweep_df.task == "clip"]
    runs = per_run(clip)
    assert runs.source.is_unique and "dataset" not in runs.columns
    table = per_dataset_table(clip)
    assert table.index[0] == ("lora", 18432) and table.index[-1][0] == "none"
    assert table.attrs["adapters"] == ["lora", "loha", "lokr", "randlora"]
    assert "mean" in table.columns and len(table.columns) == 7
    # the failed seed is excluded: LoRA@36864 mean over the 2 successful seeds
    ok = clip[(clip.method == "lora") & (clip.budget_target == 36864) & (clip.status == "success")]
    assert table.loc[("lora", 36864), "dtd"] == pytest.approx(ok[ok.dataset == "dtd"].accuracy.mean())


def test_best_adapter_mask_ignores_references_and_marks_ties():
    idx = pd.MultiIndex.from_tuples([("lora", 10), ("newmethod", 10), ("full", None)], names=["method", "b"])
    table = pd.DataFrame({"a": [0.5, 0.6, 0.9], "b": [0.7, np.nan, 0.9], "c": [np.nan, np.nan, 0.9],
                          "d": [0.8, 0.8, 0.1]}, index=idx)
    table.attrs["adapters"] = ["lora", "newmethod"]
    assert best_adapter_mask(table).tolist() == [[False, True, False, True], [True, False, False, True],
                                                 [False, False, False, False]]
    with pytest.raises(ValueError, match="needs a table from per_dataset_table"):
        best_adapter_mask(pd.DataFrame(table.to_numpy(), index=table.index))   # no attrs: not from the table
