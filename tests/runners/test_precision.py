"""Precision choices that silently lose training: full fine-tuning on a half-precision base (its updates
round away), and a float16 base (no loss scaling in the loop)."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from runners.engine.adapt import adapt
from runners.engine.config import check_values, compose_config


def _bf16_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).to(torch.bfloat16)


def _moved_fraction(model: nn.Module) -> float:
    """Share of the first layer's weights an AdamW step at lr 1e-5 changes."""
    before = model[0].weight.detach().float().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    model(torch.randn(8, 64).to(model[0].weight.dtype)).float().pow(2).mean().backward()
    opt.step()
    return float((model[0].weight.detach().float() != before).float().mean())


def test_full_fine_tuning_keeps_float32_master_weights() -> None:
    model = _bf16_net()
    adapt(model, OmegaConf.create({"name": "full"}), ["0"], [], None)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert _moved_fraction(model) > 0.9


def test_a_bf16_weight_would_not_move() -> None:
    """Why: the same step on the bf16 weights leaves most of them where they were."""
    assert _moved_fraction(_bf16_net().requires_grad_(True)) < 0.5


def test_adapters_leave_the_frozen_base_in_its_dtype() -> None:
    model = _bf16_net()
    adapt(model, OmegaConf.create({"name": "lora", "r": 2, "alpha": 4, "dropout": 0.0}), ["0", "2"], [], None)
    assert model[0].base_layer.weight.dtype == torch.bfloat16


def test_float16_base_is_refused_in_one_line() -> None:
    with pytest.raises(SystemExit, match=r"task.model.dtype=float16 is not valid: use float32, bfloat16"):
        compose_config(["task.model.dtype=float16"])
    assert check_values(compose_config(["task.model.dtype=bfloat16"])) is None
