"""What only VeRA has (the parametrized contract, parity and export tests cover the rest): its
initialisation equals PEFT's, and its rankbench-only `alpha` refuses to masquerade as a PEFT config."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import methods

peft = pytest.importorskip("peft")
VeRA = methods.get_method("vera")


@pytest.mark.parametrize("d_initial", [0.1, 0.02])
def test_initial_scaling_vectors_equal_peft(d_initial):
    net = nn.Sequential(nn.Linear(20, 30), nn.Linear(30, 12))
    ours = copy.deepcopy(net)
    methods.inject(ours, "vera", ["0", "1"], r=6, d_initial=d_initial)
    theirs = peft.get_peft_model(
        net, VeRA.peft.config(VeRA.resolve_hp({"r": 6, "d_initial": d_initial}), ["0", "1"]))
    for name, layer in methods.adapter_layers(ours).items():
        ref = theirs.base_model.model.get_submodule(name)
        assert torch.equal(layer.vera_lambda_d, ref.vera_lambda_d["default"])
        assert torch.equal(layer.vera_lambda_b, ref.vera_lambda_b["default"])
        assert torch.all(layer.vera_lambda_d == d_initial) and torch.all(layer.vera_lambda_b == 0)


def test_alpha_scales_the_update_and_only_alpha_1_has_a_peft_config():
    base = nn.Linear(16, 8)
    one, two = (methods.wrap_linear("vera", copy.deepcopy(base), r=4, alpha=a) for a in (1.0, 2.0))
    with torch.no_grad():
        for layer in (one, two):
            layer.vera_lambda_b.fill_(0.5)
    torch.testing.assert_close(two.delta_weight(), 2 * one.delta_weight())
    assert VeRA.peft.to_peft(one.hp)["r"] == 4
    with pytest.raises(ValueError,
                       match=r"vera with alpha=2.0 has no PEFT VeraConfig equivalent .*only alpha=1"):
        VeRA.peft.to_peft(two.hp)
