"""PEFT-backed methods (methods/peft_backed.py): `peft_lora` measures what the native `lora` measures, every
shipped one meets its budgets on the tiny models or says why not, and bad definitions fail in one line."""
from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from budgetmodels import build
from torch import nn

import methods
from methods import base as registry
from methods.budget import TOLERANCE
from methods.peft_backed import PeftConfigError, PeftLayer, meta_tensors, register_config

peft = pytest.importorskip("peft")

PEFT_BACKED = [m for m in methods.available() if issubclass(methods.get_method(m), PeftLayer)]
BUDGETS = ["lora1", "lora2", "lora4", "lora8", "lora16", "lora32"]
TARGETS = ["q_proj", "v_proj", "fc1", "fc2"]


def test_the_issue_24_methods_are_registered_from_their_configs():
    assert ({"peft_lora", "dora", "oft", "boft", "fourierft", "hra", "ia3", "miss", "waveft"}
            <= set(PEFT_BACKED))


# ----------------------------------------------------------------------------- peft_lora == lora
def _copy_lora(ours: nn.Module, theirs: nn.Module) -> None:
    """Native lora's A, B into peft_lora's tensors of the same layer (PEFT's names lora_A / lora_B)."""
    with torch.no_grad():
        for name, layer in methods.adapter_layers(theirs).items():
            src = methods.adapter_layers(ours)[name]
            layer.peft_lora_lora_A_weight.copy_(src.lora_A)
            layer.peft_lora_lora_B_weight.copy_(src.lora_B)


def test_peft_lora_matches_native_lora_outputs_grads_counts(tiny_net, randomize_params):
    """Same initial weights -> the same outputs, gradients and counts (the harness measures the same
    thing)."""
    ours, theirs = tiny_net(), tiny_net()
    hp = {"r": 3, "alpha": 6.0}
    methods.inject(ours, "lora", TARGETS, **hp)
    methods.inject(theirs, "peft_lora", TARGETS, **hp)
    assert methods.count_trainable(ours) == methods.count_trainable(theirs)
    assert methods.num_params_model(tiny_net(), "peft_lora", TARGETS, **hp) == methods.count_trainable(ours)
    randomize_params(ours, std=0.2)
    _copy_lora(ours, theirs)
    x = torch.randn(16, 12)
    y_ours, y_theirs = ours(x), theirs(x)
    torch.testing.assert_close(y_theirs, y_ours, rtol=1e-6, atol=1e-6)
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    for name, layer in methods.adapter_layers(ours).items():
        other = methods.adapter_layers(theirs)[name]
        torch.testing.assert_close(other.peft_lora_lora_A_weight.grad, layer.lora_A.grad,
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(other.peft_lora_lora_B_weight.grad, layer.lora_B.grad,
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(other.delta_weight(), layer.delta_weight(), rtol=1e-5, atol=1e-6)


def test_peft_lora_budget_plans_equal_native_lora():
    model, targets = build("minilm")
    for budget in ("lora2", "lora8", 100_000):
        native = methods.solve_budget_report(model, "lora", targets, budget)
        ours = methods.solve_budget_report(model, "peft_lora", targets, budget)
        assert (ours.hp, ours.achieved) == (native.hp, native.achieved), budget


@pytest.mark.parametrize("method", PEFT_BACKED)
def test_layer_is_peft_s_own_layer_and_adapts_in_place(method, tiny_net):
    model = tiny_net()
    linear = model.blocks[0].mlp.fc1
    hp = {"r": 2} if methods.get_method(method).budget_knobs else {}   # 2 divides every width (OFT, BOFT)
    methods.inject(model, method, TARGETS, **hp)
    layer = model.blocks[0].mlp.fc1
    assert isinstance(layer.tuner, peft.tuners.tuners_utils.BaseTunerLayer)
    assert layer.base_layer is linear and layer.tuner.base_layer is linear
    assert {id(p) for _, p in layer.adapter_parameters()} == {
        id(p) for n, p in layer.tuner.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- budgets
@pytest.mark.slow   # ~40 s: every shipped method x 6 budgets x 2 models, counted by PEFT on the meta device
@pytest.mark.parametrize("model_name", ["tiny-clip", "minilm"])
@pytest.mark.parametrize("method", PEFT_BACKED)
def test_budget_within_one_percent_or_refused_with_the_nearest_counts(model_name, method):
    model, targets = build(model_name)
    cls = methods.get_method(method)
    for budget in BUDGETS:
        try:
            sol = methods.solve_budget_report(model, method, targets, budget)
        except ValueError as err:
            assert re.search(r"below the smallest count|above the largest count|has no size knob", str(err))
            assert bool(cls.budget_knobs) != ("has no size knob" in str(err)), str(err)
            continue
        assert sol.achieved == methods.num_params_model(model, method, targets, **sol.hp)
        if cls.layer_patterns:   # a PEFT pattern field: the solver lands within 1%
            assert abs(sol.rel_error) <= TOLERANCE, sol.describe()
        elif not sol.reached:     # coarse knob, no pattern: the nearest single setting, both sides named
            sides = [near[1] for near in (sol.nearest_below, sol.nearest_above) if near is not None]
            assert abs(sol.achieved - sol.target) == min(abs(c - sol.target) for c in sides), sol.describe()
            assert "nearest counts of one global setting" in sol.describe()


def test_knob_less_ia3_runs_at_native_only():
    model, targets = build("tiny-clip")
    native = methods.solve_budget_report(model, "ia3", targets, "native")
    assert native.achieved == methods.num_params_model(model, "ia3", targets)
    with pytest.raises(ValueError, match=rf"ia3 has no size knob .*: {native.achieved} here\), so it runs at "
                                         r"budget=native only, not lora8"):
        methods.solve_budget_report(model, "ia3", targets, "lora8")


def test_oft_knob_values_peft_would_change_are_refused():
    """OFT's block size must divide in_features; PEFT silently picks another one, which we refuse."""
    with pytest.raises(ValueError, match=r"oft: PEFT's OFTConfig changed r=5 .* to \d+ on Linear\(12, 12\)"):
        methods.wrap_linear("oft", nn.Linear(12, 12), r=5)
    assert methods.num_params("oft", 12, 12, r=4) == 3 * 4 * 3 // 2   # 3 blocks of 4x4 skew: b (b - 1) / 2


# ----------------------------------------------------------------------------- bad definitions: one line each
@pytest.fixture
def scratch_registry(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


@pytest.mark.parametrize("peft_block, error", [
    ({"config": "DoraConfig", "label": "x", "knob": "r"},
     r"bad_m: 'DoraConfig' is not a PEFT config class \(peft [\d.]+\); valid: .*LoraConfig"),
    ({"config": "HRAConfig", "label": "x", "knob": "rank"},
     r"bad_m: PEFT's HRAConfig refuses .*rank=4: .*unexpected keyword argument 'rank'"),
    ({"config": "VBLoRAConfig", "label": "x", "knob": "r"},
     r"bad_m: PEFT's VBLoRAConfig cannot wrap Linear\(12, 8\) with r=4: .*shared state"),
])
def test_bad_peft_definitions_fail_in_one_line(peft_block, error, scratch_registry):
    config = {"name": "bad_m", "r": 4, "peft": peft_block}
    register_config("bad_m", config)
    hp = {"r": 4} if "knob" in peft_block else {}
    with pytest.raises(PeftConfigError, match=error) as err:
        methods.wrap_linear("bad_m", nn.Linear(12, 8), **hp)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=error):
        methods.num_params_model(nn.Sequential(nn.Linear(12, 8)), "bad_m", ["0"], **hp)


@pytest.mark.parametrize("peft_block, error", [
    ({"config": "LoraConfig", "label": "x", "knob": "r", "knob_maximum": "in"},
     r"bad_m.yaml: unknown key peft.knob_maximum; a peft block has config, label, knob, .*knob_max"),
    ({"label": "x", "knob": "r"}, r"bad_m.yaml: peft.config is required; a peft block has config"),
])
def test_a_peft_block_key_that_would_be_ignored_is_refused(peft_block, error, scratch_registry):
    with pytest.raises(PeftConfigError, match=error):
        register_config("bad_m", {"name": "bad_m", "r": 4, "peft": peft_block})
    assert "bad_m" not in methods.available()


def test_half_precision_inputs_keep_dtype_and_parity(randomize_params):
    """A bf16 base: PEFT's layer trains fp32 tensors (as get_peft_model's autocast_adapter_dtype) and the
    output follows the native lora's within bf16 rounding."""
    torch.manual_seed(0)
    base = nn.Linear(24, 40).to(torch.bfloat16)
    native = methods.wrap_linear("lora", copy.deepcopy(base), r=4, alpha=8)
    backed = methods.wrap_linear("peft_lora", copy.deepcopy(base), r=4, alpha=8)
    randomize_params(native, std=0.1)
    with torch.no_grad():
        backed.peft_lora_lora_A_weight.copy_(native.lora_A)
        backed.peft_lora_lora_B_weight.copy_(native.lora_B)
    x = torch.randn(5, 24, dtype=torch.bfloat16)
    torch.testing.assert_close(backed(x).float(), native(x).float(), rtol=2e-2, atol=2e-2)


def test_counting_is_quiet_about_values_it_refuses():
    """The budget solver counts hundreds of knob values on meta layers; PEFT warns for each OFT block size it
    would change, which build_tuner refuses anyway: counting shows none of them."""
    hp = {**methods.get_method("oft").resolve_hp({}), "r": 7}   # 7 does not divide 90
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(PeftConfigError, match="changed r=7"):
            meta_tensors("oft", 90, 90, tuple(sorted(hp.items())))
    assert not [w for w in caught if "oft_block_size" in str(w.message)]
