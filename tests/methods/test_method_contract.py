"""The contract every registered method must satisfy (one parametrized file, not one copy per method)."""
from __future__ import annotations

import copy
import json
import re
import struct

import pytest
import torch
import torch.nn.functional as F
from rbtest import own
from torch import nn

import methods

METHODS = methods.available()
SHAPES = [(40, 24), (24, 40), (36, 36), (100, 37)]  # (in, out): in > out, out > in, square, awkward
TINY_TARGETS = ["q_proj", "v_proj", "fc1", "fc2"]
# Settings beyond r that change a method's structure; any new method is still covered through `r`.
EXTRA_HP = {
    "lokr": [{"factor": 2}, {"factor": 4, "decompose_both": True}, {"factor": -1, "decompose_both": True}],
    "randlora": [{"sparse": True}],
}


def hp_variants(method: str) -> list[dict]:
    ranks = [{"r": r} for r in (1, 3, 8, 32)]
    return ranks + [{"r": 2, **extra} for extra in EXTRA_HP.get(method, [])]


TINY_SHAPES = [(12, 12), (12, 30), (30, 12), (12, 20), (20, 12)]   # TinyNet's targeted Linear shapes


def test_required_methods_registered():
    assert {"lora", "loha", "lokr", "randlora"} <= set(METHODS)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES)
def test_closed_form_count_equals_real_count(method, shape):
    for hp in hp_variants(method):
        hp = own(method, [shape], **hp)
        layer = methods.wrap_linear(method, nn.Linear(*shape), **hp)
        assert methods.count_trainable(layer) == methods.num_params(method, *shape, **hp), hp


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES)
def test_identity_at_init_and_forward_equals_merged_weight(method, shape, randomize_params):
    torch.manual_seed(0)
    base = nn.Linear(*shape)
    layer = methods.wrap_linear(method, copy.deepcopy(base), **own(method, [shape], r=4))
    x = torch.randn(3, 5, shape[0])
    exact = getattr(type(layer), "init_exact", True)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0 if exact else 1e-5)
    randomize_params(layer)
    dw = layer.delta_weight()
    assert dw.shape == (shape[1], shape[0]) and dw.abs().max() > 0
    expected = F.linear(x, base.weight + dw, base.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("method", METHODS)
def test_only_adapter_params_train(method, tiny_net, randomize_params):
    model = tiny_net()
    hp = own(method, TINY_SHAPES, r=2, alpha=2)
    names = methods.inject(model, method, TINY_TARGETS, **hp)
    assert names == [n for n, m in tiny_net().named_modules() if n.rsplit(".", 1)[-1] in TINY_TARGETS]
    assert methods.count_trainable(model) == methods.num_params_model(tiny_net(), method, TINY_TARGETS, **hp)
    prefix = f"{method}_"
    for name, p in model.named_parameters():
        assert p.requires_grad == (name.rsplit(".", 1)[-1].startswith(prefix)), name
    randomize_params(model, std=0.1)
    model(torch.randn(4, 12)).square().sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert set(methods.adapter_layers(model)) == set(names)


@pytest.mark.parametrize("method", [m for m in METHODS if "dropout" in methods.get_method(m).hp_spec])
def test_dropout_acts_on_adapter_input_in_training_only(method, randomize_params):
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = methods.wrap_linear(method, copy.deepcopy(base), **own(method, [(16, 12)], r=2, dropout=0.5))
    randomize_params(layer)
    x = torch.randn(64, 16)
    expected = F.linear(x, base.weight + layer.delta_weight(), base.bias)
    torch.testing.assert_close(layer.eval()(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert not torch.allclose(layer.train()(x), expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_merge_unmerge_round_trip(method, tiny_net, randomize_params):
    model = tiny_net()
    methods.inject(model, method, TINY_TARGETS, **own(method, TINY_SHAPES, r=2, alpha=2))
    randomize_params(model, std=0.1)
    x = torch.randn(4, 12)
    before = model(x)
    weights = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    methods.merge(model)
    assert all(layer.merged for layer in methods.adapter_layers(model).values())
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    methods.unmerge(model)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(method, tiny_net, randomize_params, tmp_path):
    hp = own(method, TINY_SHAPES, r=3, alpha=6)
    model = tiny_net()
    methods.inject(model, method, TINY_TARGETS, **hp)
    randomize_params(model, std=0.1)
    x = torch.randn(4, 12)
    weights = methods.save_adapter(model, tmp_path)
    n = methods.count_trainable(model)
    # safetensors = 8-byte length + JSON header + raw fp32 data: nothing but the trainable tensors
    (header_len,) = struct.unpack("<Q", weights.read_bytes()[:8])
    assert weights.stat().st_size == 8 + header_len + 4 * n
    assert header_len < 200 * len(methods.adapter_layers(model)) * 4
    header = json.loads(weights.read_bytes()[8:8 + header_len])
    assert all(k.rsplit(".", 1)[-1].startswith(f"{method}_") for k in header if k != "__metadata__")
    fresh = tiny_net()                      # a plain base model: load_adapter injects first
    assert methods.load_adapter(fresh, tmp_path) == list(methods.adapter_layers(model))
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    injected = tiny_net()                   # an already injected model with other adapter values
    methods.inject(injected, method, TINY_TARGETS, **hp)
    methods.load_adapter(injected, tmp_path)
    torch.testing.assert_close(injected(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("method", [m for m in METHODS if methods.get_method(m).peft.random])
def test_random_bases_shared_regenerated_not_saved(method, tiny_net, tmp_path):
    """Frozen random bases (RandLoRA, VeRA): one pair for all layers, rebuilt from the seed, never saved."""
    random = methods.get_method(method).peft.random
    model = tiny_net()
    methods.inject(model, method, TINY_TARGETS, r=4, seed=3)
    bases = {id(layer.bases) for layer in methods.adapter_layers(model).values()}
    assert len(bases) == 1
    assert not any(name in k for k in model.state_dict() for name in random)
    methods.save_adapter(model, tmp_path)
    other = tiny_net()
    methods.load_adapter(other, tmp_path)
    a, b = (next(iter(methods.adapter_layers(m).values())).bases for m in (model, other))
    assert all(torch.equal(getattr(a, name), getattr(b, name)) for name in random)
    reseeded = tiny_net()
    methods.inject(reseeded, method, TINY_TARGETS, r=4, seed=4)
    assert not torch.equal(getattr(next(iter(methods.adapter_layers(reseeded).values())).bases, random[0]),
                           getattr(a, random[0]))
    with pytest.raises(ValueError, match="does not match"):
        methods.load_adapter(reseeded, tmp_path)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape,r", [((40, 24), 1), ((40, 24), 3), ((30, 50), 2), ((36, 36), 5)])
def test_rank_of_delta_reaches_structural_bound(method, shape, r, randomize_params):
    layer = methods.wrap_linear(method, nn.Linear(*shape), **own(method, [shape], r=r))
    randomize_params(layer, seed=r)
    rank = torch.linalg.matrix_rank(layer.delta_weight().detach()).item()
    bound = type(layer).max_rank(*shape, **layer.hp)
    assert rank == bound if type(layer).max_rank_exact else 0 < rank <= bound
    expected = {"lora": min(r, *shape), "loha": min(r * r, *shape), "randlora": min(shape)}
    if method in expected:
        assert bound == expected[method]


# ----------------------------------------------------------------------------- bad input
def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown method 'nora'; valid methods: ") as err:
        methods.num_params("nora", 8, 8)
    assert str(err.value).endswith(", ".join(METHODS))
    with pytest.raises(ValueError, match="valid methods"):
        methods.wrap_linear("LoRA", nn.Linear(4, 4))


KNOBBED = [m for m in METHODS if "r" in methods.get_method(m).hp_spec]


@pytest.mark.parametrize("method", KNOBBED)
@pytest.mark.parametrize("r", [0, -3, 2.5, 8.0, "8", True, None])
def test_bad_rank(method, r):
    with pytest.raises(ValueError, match=r"r must be a positive integer .*got"):
        methods.wrap_linear(method, nn.Linear(8, 8), r=r)
    with pytest.raises(ValueError, match="r must be a positive integer"):
        methods.num_params(method, 8, 8, r=r)


@pytest.mark.parametrize("method", KNOBBED)
def test_unknown_hyper_parameter_lists_valid_ones(method):
    with pytest.raises(ValueError, match=r"unknown hyper-parameter.*rank.*valid: .*'r'"):
        methods.num_params(method, 8, 8, rank=4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("targets", [["query"], ["q_proj", "qproj"], "blocks\\.9\\..*"])
def test_target_matching_nothing_names_existing_linears(method, targets, tiny_net):
    model = tiny_net()
    with pytest.raises(ValueError, match=r"matched no nn.Linear.*'fc1'.*'q_proj'"):
        methods.inject(model, method, targets, **own(method, TINY_SHAPES, r=2))
    assert methods.count_trainable(model) == sum(p.numel() for p in model.parameters())  # untouched


def test_regex_targets_and_no_double_injection(tiny_net):
    model = tiny_net()
    names = methods.inject(model, "lora", r"blocks\.0\..*_proj", r=2)
    assert names == [f"blocks.0.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "out_proj")]
    with pytest.raises(ValueError, match="already has adapters"):
        methods.inject(model, "lora", ["fc1"], r=2)


@pytest.mark.parametrize("method", [m for m in METHODS if methods.get_method(m).budget_knobs])
def test_budget_below_smallest_says_smallest(method, tiny_net):
    model = tiny_net()
    with pytest.raises(ValueError, match=rf"below the smallest count {method} can achieve") as err:
        methods.solve_budget(model, method, TINY_TARGETS, 1)
    smallest = int(re.search(r"can achieve on these targets: (\d+)", str(err.value)).group(1))
    assert methods.solve_budget_report(model, method, TINY_TARGETS, smallest).achieved == smallest
    with pytest.raises(ValueError, match=f"budget {smallest - 1} is below the smallest.*: {smallest} "):
        methods.solve_budget(model, method, TINY_TARGETS, smallest - 1)


@pytest.mark.parametrize("budget", [0, -5, "lora", "lora-2", "big", 1.5, None])
def test_bad_budget_value(budget, tiny_net):
    with pytest.raises(ValueError, match="budget must be a positive parameter count"):
        methods.resolve_budget(tiny_net(), TINY_TARGETS, budget)


@pytest.mark.parametrize("method", METHODS)
def test_real_transformers_clip(method, randomize_params):
    """Hugging Face CLIP (tiny, random, offline): wrapping its attention/MLP Linears keeps it working."""
    transformers = pytest.importorskip("transformers")
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "vocab_size": 100, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1}
    vision = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 16}
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    hp = own(method, [(32, 32), (32, 64), (64, 32), (48, 48), (48, 96), (96, 48)], r=4)
    expected = methods.num_params_model(model, method, targets, **hp)
    batch = {"input_ids": torch.randint(2, 100, (2, 8)), "pixel_values": torch.randn(2, 3, 32, 32)}
    before = model(**batch).logits_per_image
    assert len(methods.inject(model, method, targets, **hp)) == 24
    assert methods.count_trainable(model) == expected
    exact = getattr(methods.get_method(method), "init_exact", True)
    torch.testing.assert_close(model(**batch).logits_per_image, before, rtol=0, atol=0 if exact else 1e-5)
    randomize_params(model, std=0.01)
    adapted = model(**batch).logits_per_image
    methods.merge(model)
    torch.testing.assert_close(model(**batch).logits_per_image, adapted, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_half_precision_base_trains_fp32_adapter(method, randomize_params):
    """A bf16 frozen base (memory saver for large models) keeps fp32 adapter weights, as PEFT does."""
    base = nn.Linear(24, 40).to(torch.bfloat16)
    layer = methods.wrap_linear(method, base, **own(method, [(24, 40)], r=4))
    randomize_params(layer, std=0.1)
    assert all(p.dtype == torch.float32 for _, p in layer.adapter_parameters())
    x = torch.randn(3, 24, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    expected = F.linear(x.float(), base.weight.float() + layer.delta_weight(), base.bias.float())
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for _, p in layer.adapter_parameters())
