"""Paired statistics between methods (analysis/paired.py) on hand-made numbers."""
import json
import math

import pandas as pd
import pytest

from analysis.paired import SUITE, noise_floor, paired_differences, per_test_set_noise, win_tie_loss

PANEL = {"task": "clip", "size": "tiny", "model": "tiny-clip", "regime": "full"}


def _rows(method: str, accs: dict[int, dict[str, float]], budget: int = 100,
          n: int | None = None) -> list[dict]:
    return [{**PANEL, "method": method, "method_kind": "adapter", "method_label": method.upper(),
             "budget_target": budget, "seed": seed, "dataset": d, "accuracy": a,
             "dataset_metrics": json.dumps({"accuracy": a}), "eval_examples": n,
             "mean_accuracy": sum(per.values()) / len(per), "status": "success",
             "source": f"{method}-{budget}-{seed}"}
            for seed, per in accs.items() for d, a in per.items()]


def test_paired_interval_on_hand_made_numbers():
    # per-seed suite means: lora 0.60 0.70 0.80, loha 0.50 0.65 0.70 -> differences 0.10 0.05 0.10
    df = pd.DataFrame(
        _rows("lora", {0: {"x": 0.6, "y": 0.6}, 1: {"x": 0.7, "y": 0.7}, 2: {"x": 0.8, "y": 0.8}})
        + _rows("loha", {0: {"x": 0.5, "y": 0.5}, 1: {"x": 0.6, "y": 0.7}, 2: {"x": 0.7, "y": 0.7}}))
    paired = paired_differences(df)
    suite = paired[paired["dataset"] == SUITE].iloc[0]
    assert (suite["method_a"], suite["method_b"], suite["n"]) == ("lora", "loha", 3)
    mean, sd = 0.25 / 3, math.sqrt(((0.1 - 0.25 / 3) ** 2 * 2 + (0.05 - 0.25 / 3) ** 2) / 2)
    half = 4.303 * sd / math.sqrt(3)  # t(0.975, 2 df)
    assert suite["mean_diff"] == pytest.approx(mean)
    assert (suite["ci_low"], suite["ci_high"]) == (pytest.approx(mean - half), pytest.approx(mean + half))
    x = paired[paired["dataset"] == "x"].iloc[0]
    assert x["mean_diff"] == pytest.approx(0.1)  # 0.1 at every seed: a zero-width interval
    assert x["ci_low"] == pytest.approx(0.1) and x["ci_high"] == pytest.approx(0.1)
    wtl = win_tie_loss(paired).iloc[0]
    assert (wtl["win"], wtl["tie"], wtl["loss"]) == (1, 0, 0)  # the suite interval [0.012, 0.155] is above 0


def test_a_clear_difference_is_a_win_and_one_seed_is_a_tie():
    df = pd.DataFrame(_rows("lora", {0: {"x": 0.9}, 1: {"x": 0.91}, 2: {"x": 0.92}})
                      + _rows("randlora", {0: {"x": 0.5}, 1: {"x": 0.52}, 2: {"x": 0.5}})
                      + _rows("lora", {0: {"x": 0.9}}, budget=200)
                      + _rows("randlora", {0: {"x": 0.1}}, budget=200))
    wtl = win_tie_loss(paired_differences(df)).iloc[0]
    assert ((wtl["method_a"], wtl["method_b"], wtl["win"], wtl["tie"], wtl["loss"])
            == ("lora", "randlora", 1, 1, 0))


def test_noise_floor_is_the_seed_to_seed_spread():
    df = pd.DataFrame(_rows("lora", {0: {"x": 0.6}, 1: {"x": 0.7}, 2: {"x": 0.8}}))
    floor = noise_floor(df).iloc[0]
    assert floor["seed_std_median"] == pytest.approx(0.1) and floor["configurations"] == 1
    assert math.isnan(floor["binomial_se_median"])  # the runs recorded no test-set sizes


def test_binomial_error_of_each_test_set_and_of_a_suite_mean():
    # two test sets of 100 examples; accuracies 0.5 and 0.9 at every seed
    df = pd.DataFrame(_rows("lora", {s: {"x": 0.5, "y": 0.9} for s in range(3)}, n=100)
                      + _rows("loha", {0: {"x": 0.4, "y": 0.9}, 1: {"x": 0.6, "y": 0.9}}, n=100))
    sets = per_test_set_noise(df).set_index("dataset")
    assert sets.at["x", "eval_examples"] == 100 and sets.at["x", "accuracy_median"] == pytest.approx(0.5)
    assert sets.at["x", "binomial_se"] == pytest.approx(0.05)  # sqrt(0.5 * 0.5 / 100)
    assert sets.at["y", "binomial_se"] == pytest.approx(0.03)  # sqrt(0.9 * 0.1 / 100)
    # the median of 0 and std(0.4, 0.6)
    assert sets.at["x", "seed_std_median"] == pytest.approx(math.sqrt(0.02) / 2)
    floor = noise_floor(df).iloc[0]
    # lora's suite mean: sqrt(0.05^2 + 0.03^2) / 2 per run; loha's: sqrt(0.048^2 + 0.03^2) / 2
    # (p = 0.4 or 0.6)
    lora, loha = math.sqrt(0.0025 + 0.0009) / 2, math.sqrt(0.0024 + 0.0009) / 2
    assert floor["binomial_se_median"] == pytest.approx(sorted([lora] * 3 + [loha] * 2)[2])
