"""Turn a pretrained model into the thing a method trains: adapters, the full backbone, or the head only.

Adapter methods come from the `methods` registry; `full` and `none` are the two reference points.
Whatever the method, the task head (`task.head_prefixes`) is trained and counted separately.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

import methods

log = logging.getLogger(__name__)

_NOT_HP = ("name", "lr")


@dataclass
class Adaptation:
    """What was trained: the method's resolved hyper-parameters and its parameter counts."""

    method: str
    hp: dict[str, Any]
    budget_target: int | None
    backbone_trainable: int  # adapter (or full backbone) parameters: the budgeted quantity
    head_trainable: int
    wrapped: list[str] = field(default_factory=list)
    rank_layers: list[str] = field(default_factory=list)  # targeted Linear layers, to measure rank(dW)

    @property
    def budget_error(self) -> float | None:
        if not self.budget_target:
            return None
        return (self.backbone_trainable - self.budget_target) / self.budget_target


def _train_all(model: nn.Module, targets: Any, hp: dict) -> list[str]:
    model.requires_grad_(True)
    return []


def _train_none(model: nn.Module, targets: Any, hp: dict) -> list[str]:
    model.requires_grad_(False)
    return []


# Reference points that are not adapters; everything else is looked up in the methods registry.
REFERENCES: dict[str, Callable[[nn.Module, Any, dict], list[str]]] = {"full": _train_all, "none": _train_none}


#: What figures and tables call the references (adapters carry their own `label` in the registry).
REFERENCE_LABELS = {"full": "Full FT", "none": "Head-only"}


def method_names() -> list[str]:
    return sorted(methods.available()) + sorted(REFERENCES)


def method_info(name: str) -> dict[str, str]:
    """What analysis needs to know about a method without importing `methods` (torch): whether it is an
    adapter or a reference point, and the name figures show. Recorded in every results.json."""
    if name in REFERENCES:
        return {"kind": "reference", "label": REFERENCE_LABELS[name]}
    return {"kind": "adapter", "label": methods.get_method(name).label}


def adapt(model: nn.Module, method_cfg: DictConfig, target_modules: Any, head_prefixes: list[str],
          budget: int | str | None, budget_alpha: str = "ratio") -> Adaptation:
    """Apply the configured method in place; return its hyper-parameters and trainable counts."""
    name = method_cfg.name
    hp = {k: v for k, v in OmegaConf.to_container(method_cfg, resolve=True).items() if k not in _NOT_HP}
    if budget_alpha not in ("ratio", "fixed"):
        raise ValueError(f"budget_alpha={budget_alpha!r} is not valid; use ratio or fixed")
    if name not in REFERENCES and name not in methods.available():
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(method_names())}")

    budget_target = None
    rank_layers = list(methods.find_targets(model, target_modules))
    if name in REFERENCES:
        if budget is not None:
            log.info("budget=%s ignored: the %r reference trains a fixed set of weights", budget, name)
        wrapped = REFERENCES[name](model, target_modules, hp)
        expected = None
    else:
        if budget is not None:
            budget_target = methods.resolve_budget(model, target_modules, budget)
            hp.update(_keep_scaling(hp, methods.solve_budget(model, name, target_modules, budget, **hp),
                                    keep_ratio=budget_alpha == "ratio"))
        expected = methods.num_params_model(model, name, target_modules, **hp)
        wrapped = methods.inject(model, name, target_modules, **hp)

    head = _unfreeze_head(model, head_prefixes)
    backbone = methods.count_trainable(model) - head
    if expected is not None and backbone != expected:
        raise AssertionError(f"{name}: {backbone} trainable adapter parameters, closed form says {expected}")
    return Adaptation(name, hp, budget_target, backbone, head, wrapped, rank_layers)


def _keep_scaling(hp: dict[str, Any], solved: dict[str, Any], keep_ratio: bool) -> dict[str, Any]:
    """With `budget_alpha=ratio`, a solved rank keeps the configured scaling alpha/r (alpha = 2r for LoRA,
    20r for RandLoRA as PEFT recommends); a fixed alpha would make RandLoRA's scaling 320 at r=2."""
    if keep_ratio and "r" in solved and "r" in hp and "alpha" in hp and "alpha" not in solved:
        return {**solved, "alpha": hp["alpha"] * solved["r"] / hp["r"]}
    return solved


def is_head(param_name: str, prefixes: list[str]) -> bool:
    """True for parameters of the task head (named by `task.head_prefixes`)."""
    return any(param_name == p or param_name.startswith(p + ".") for p in prefixes)


def _unfreeze_head(model: nn.Module, prefixes: list[str]) -> int:
    """Train the task head for every method; returns the number of head parameters."""
    count = 0
    for pname, param in model.named_parameters():
        if is_head(pname, prefixes):
            param.requires_grad_(True)
            count += param.numel()
    if prefixes and count == 0:
        raise ValueError(f"head_prefixes {prefixes} match no parameter of the model")
    return count
