"""Turn a pretrained model into the thing a method trains: adapters, the full backbone, or the head only.

Adapter methods come from the `methods` registry; `full` and `none` are the two reference points.
Whatever the method, the task head (`task.head_prefixes`) is trained and counted separately.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

import methods

log = logging.getLogger(__name__)

NOT_HP = ("name", "lr", "peft")  # peft: a PEFT-backed method's definition (methods/peft_backed.py)


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
    #: the count is within methods.budget.TOLERANCE of the budget (None: no budget, e.g. the references)
    budget_reached: bool | None = None
    #: {layer: {knob: value}} for the layers whose solved knob differs from the global hp (None: uniform)
    per_layer: dict[str, dict[str, Any]] | None = None
    #: adapter tensor shapes per layer shape ("in x out"): e.g. the Kronecker factorization LoKr got
    structure: dict[str, dict[str, list[int]]] | None = None

    @property
    def budget_error(self) -> float | None:
        if not self.budget_target:
            return None
        return (self.backbone_trainable - self.budget_target) / self.budget_target


def _train_all(model: nn.Module, targets: Any, hp: dict) -> list[str]:
    """Full fine-tuning trains the weights themselves, so they are kept in float32 (the master weights):
    on a bfloat16 base, AdamW steps at lr 1e-5 fall below bf16's resolution (8 bits of mantissa) and most
    weights never move. GPU runs still compute under bf16 autocast (`trainer.bf16`)."""
    half = [p for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)]
    for param in half:
        param.data = param.data.float()
    if half:
        log.info("full fine-tuning: %d half-precision weight tensors kept as float32 master weights",
                 len(half))
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
          budget: int | str | None, budget_alpha: str = "ratio", untrained: Any = None) -> Adaptation:
    """Apply the configured method in place; return its hyper-parameters and trainable counts. Adapters of
    the layers `untrained` selects are counted but get no gradient (tasks.base.Task.untrained_targets)."""
    name = method_cfg.name
    config = OmegaConf.to_container(method_cfg, resolve=True)
    hp = {k: v for k, v in config.items() if k not in NOT_HP}
    if budget_alpha not in ("ratio", "fixed"):
        raise ValueError(f"budget_alpha={budget_alpha!r} is not valid; use ratio or fixed")
    if name not in REFERENCES and name not in methods.available():
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(method_names())}")
    if "peft" in config:   # a PEFT-backed method's definition (methods/peft_backed.py)
        methods.peft_backed.check_definition(name, config["peft"])

    budget_target, solution = None, None
    rank_layers = list(methods.find_targets(model, target_modules))
    if name in REFERENCES:
        if budget is not None:
            log.info("budget=%s ignored: the %r reference trains a fixed set of weights", budget, name)
        wrapped = REFERENCES[name](model, target_modules, hp)
        expected = None
    else:
        if budget is not None:
            solution = _solve(model, name, target_modules, budget, hp)
            budget_target = solution.target
            hp.update(_keep_scaling(hp, solution.hp, keep_ratio=budget_alpha == "ratio"))
        expected = methods.num_params_model(model, name, target_modules, **hp)
        wrapped = methods.inject(model, name, target_modules, **hp)
        if untrained:
            idle = methods.leave_untrained(model, untrained)
            log.info("%d of %d adapters counted but never trained (%s)", len(idle), len(wrapped), untrained)

    head = _unfreeze_head(model, head_prefixes)
    backbone = methods.count_trainable(model) - head
    if expected is not None and backbone != expected:
        raise AssertionError(f"{name}: {backbone} trainable adapter parameters, closed form says {expected}")
    if solution is None:
        return Adaptation(name, hp, budget_target, backbone, head, wrapped, rank_layers)
    return Adaptation(name, hp, budget_target, backbone, head, wrapped, rank_layers,
                      budget_reached=solution.reached, per_layer=solution.per_layer or None,
                      structure=solution.structure)


def _solve(model: nn.Module, name: str, targets: Any, budget: int | str, hp: dict[str, Any]
           ) -> methods.BudgetSolution:
    """The budget's plan (see methods.budget); one log line, a warning when it is more than the
    tolerance off (the run goes on, recorded as `budget_reached: false`). Outside the range the knobs
    reach, methods refuses it (a ValueError: the run fails in one line before training)."""
    solution = methods.solve_budget_report(model, name, targets, budget, **hp)
    if solution.reached:
        log.info("budget %s: %s", budget, solution.describe())
    else:
        log.warning("budget %s not reached within %.0f%%: %s parameters, %+.2f%% off (%s)", budget,
                    100 * methods.budget.TOLERANCE, solution.achieved, 100 * solution.rel_error,
                    solution.describe())
    return solution


def _keep_scaling(hp: dict[str, Any], solved: dict[str, Any], keep_ratio: bool) -> dict[str, Any]:
    """With `budget_alpha=ratio`, a solved rank keeps the configured scaling alpha/r (alpha = 2r for LoRA,
    20r for RandLoRA as PEFT recommends); a fixed alpha would make RandLoRA's scaling 320 at r=2. Layers
    the solver gave their own r keep it too (an `alpha_pattern`); with `fixed`, every layer keeps alpha."""
    if keep_ratio and "r" in solved and "r" in hp and "alpha" in hp and "alpha" not in solved:
        own = solved.get("rank_pattern") or {}  # present only when some layers have their own r
        def alpha(r: int) -> float:
            return hp["alpha"] * r / hp["r"]

        return {**solved, "alpha": alpha(solved["r"]),
                **({"alpha_pattern": {n: alpha(r) for n, r in own.items()}} if own else {})}
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
