"""Budgets on a CLIP ViT-B/32-shaped model (meta device: shapes only, nothing allocated)."""
from __future__ import annotations

import ast
import re

import pytest
from torch import nn

import methods

CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]

BUDGETS = ["lora4", "lora8", "lora16", "lora32"]
# Budgets a method's knobs cannot reach within 2%; the solver must then say what is achievable.
# RandLoRA's count ~ 72 * (768^2 + 512^2) / r jumps by ~4% per r step near r = 60.
EXPECTED_MISSES = {("randlora", "lora4")}


def lora_count(r: int) -> int:
    """LoRA on q, k, v, out (square) and fc1, fc2 of 12 vision (768/3072) + 12 text (512/2048) blocks."""
    return 12 * r * (4 * 2 * 768 + 2 * (768 + 3072)) + 12 * r * (4 * 2 * 512 + 2 * (512 + 2048))


@pytest.mark.parametrize("budget", BUDGETS)
def test_lora_budget_strings(clip_b32_meta, budget):
    r = int(budget[4:])
    assert methods.resolve_budget(clip_b32_meta, CLIP_TARGETS, budget) == lora_count(r)
    assert methods.num_params_model(clip_b32_meta, "lora", CLIP_TARGETS, r=r) == lora_count(r)
    assert methods.solve_budget(clip_b32_meta, "lora", CLIP_TARGETS, budget) == {"r": r}
    assert methods.solve_budget(clip_b32_meta, "loha", CLIP_TARGETS, budget) == {"r": r // 2}


def test_numeric_budgets(clip_b32_meta):
    assert methods.resolve_budget(clip_b32_meta, CLIP_TARGETS, 123_456) == 123_456
    assert methods.resolve_budget(clip_b32_meta, CLIP_TARGETS, "123456") == 123_456
    assert methods.resolve_budget(clip_b32_meta, CLIP_TARGETS, 1.5e6) == 1_500_000


@pytest.mark.parametrize("method", methods.available())
@pytest.mark.parametrize("budget", BUDGETS)
def test_every_method_lands_within_two_percent_or_says_why(clip_b32_meta, method, budget):
    sol = methods.solve_budget_report(clip_b32_meta, method, CLIP_TARGETS, budget)
    assert sol.target == methods.resolve_budget(clip_b32_meta, CLIP_TARGETS, budget)
    assert sol.achieved == methods.num_params_model(clip_b32_meta, method, CLIP_TARGETS, **sol.hp)
    assert set(sol.hp) <= set(methods.get_method(method).budget_knobs)
    missed = abs(sol.rel_error) > 0.02
    assert missed == ((method, budget) in EXPECTED_MISSES), sol.describe()
    below, above = sol.nearest_below, sol.nearest_above
    assert below[1] <= sol.target <= above[1] and sol.achieved in (below[1], above[1])
    if missed:
        text = sol.describe()
        assert f"below: {below[1]}" in text and f"above: {above[1]}" in text
        with pytest.raises(ValueError, match=rf"within 2.0%.*below: {below[1]}.*above: {above[1]}"):
            methods.solve_budget(clip_b32_meta, method, CLIP_TARGETS, budget, max_rel_error=0.02)


def test_a_full_method_config_can_be_passed(clip_b32_meta):
    """Knob values in the config (r, factor) are overridden; the other hp shape the search."""
    config = {"r": 8, "alpha": 8, "dropout": 0.1, "factor": -1, "decompose_both": False}
    assert methods.solve_budget(clip_b32_meta, "lokr", CLIP_TARGETS, "lora8", **config) == \
        methods.solve_budget(clip_b32_meta, "lokr", CLIP_TARGETS, "lora8")
    assert methods.solve_budget(clip_b32_meta, "lora", CLIP_TARGETS, "lora16", r=8, alpha=16) == {"r": 16}
    hp = methods.solve_budget(clip_b32_meta, "randlora", CLIP_TARGETS, "lora8", r=32, alpha=640, seed=1)
    assert set(hp) == {"r"}
    with pytest.raises(ValueError, match="r must be a positive integer"):
        methods.solve_budget(clip_b32_meta, "lora", CLIP_TARGETS, "lora8", r=0)


def test_lokr_balanced_split_cannot_reach_lora_budgets(clip_b32_meta):
    """With factor -1 every Kronecker factor is small, so LoKr saturates far below LoRA-4: the solver
    has to pick a small factor (documented in methods/lokr.py)."""
    most = max(methods.num_params_model(clip_b32_meta, "lokr", CLIP_TARGETS, r=r, factor=-1, decompose_both=d)
               for r in (1, 8, 64, 512) for d in (False, True))
    assert most < methods.resolve_budget(clip_b32_meta, CLIP_TARGETS, "lora4") / 3


def test_budget_below_smallest_on_clip(clip_b32_meta):
    with pytest.raises(ValueError, match=r"below the smallest count randlora can achieve on these targets: \d"):
        methods.solve_budget(clip_b32_meta, "randlora", CLIP_TARGETS, 100_000)


def test_budget_above_largest_on_clip_names_the_largest(clip_b32_meta):
    largest = methods.num_params_model(clip_b32_meta, "lora", CLIP_TARGETS, r=512)  # r up to the 512-wide text
    with pytest.raises(ValueError, match=rf"above the largest count lora can achieve on these targets: {largest} "
                                         r"\(with \{'r': 512\}\)"):
        methods.solve_budget(clip_b32_meta, "lora", CLIP_TARGETS, 100_000_000_000)
    assert methods.solve_budget(clip_b32_meta, "lora", CLIP_TARGETS, largest) == {"r": 512}


@pytest.mark.parametrize("method", methods.available())
def test_the_largest_count_named_is_one_inject_accepts(clip_b32_meta, method):
    """The solver never picks a setting `inject` refuses (an r above a target's larger dimension)."""
    with pytest.raises(ValueError, match="above the largest count") as refused:
        methods.solve_budget(clip_b32_meta, method, CLIP_TARGETS, 10**12)
    count, knobs = re.search(r": (\d+) \(with (\{.*\})\)$", str(refused.value)).groups()
    assert methods.num_params_model(clip_b32_meta, method, CLIP_TARGETS, **ast.literal_eval(knobs)) == int(count)


@pytest.mark.parametrize("method", methods.available())
def test_rank_above_a_layers_larger_dimension_is_refused_before_allocating(clip_b32_meta, method):
    """LoRA r=100000 on 128-wide layers once wrapped 1.43B parameters and hung; now one line, no allocation."""
    expected = r"r=100000 is too large for Linear\(128, 128\).*the largest valid r there is 128.*valid: 1\.\.128"
    with pytest.raises(ValueError, match=expected):
        methods.num_params(method, 128, 128, r=100_000)
    with pytest.raises(ValueError, match=expected):
        methods.wrap_linear(method, nn.Linear(128, 128), r=100_000)
    model = nn.Sequential(nn.Linear(128, 256), nn.Linear(256, 128), nn.Linear(128, 128))
    with pytest.raises(ValueError, match=r"r=100000 is too large for Linear\(128, 128\) \('2'\): the largest"):
        methods.inject(model, method, ["0", "1", "2"], r=100_000)
    assert not methods.adapter_layers(model) and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="largest valid r there is 512"):
        methods.num_params_model(clip_b32_meta, method, CLIP_TARGETS, r=513)
    assert methods.num_params(method, 128, 128, r=128) > 0
    assert methods.wrap_linear(method, nn.Linear(128, 64), r=128).hp["r"] == 128  # the limit itself is valid
