"""Parameter budgets: "what LoRA rank N costs", and each method's knobs that land nearest to it.

Only Linear shapes are needed, so a model built on the `meta` device (no weights allocated) is enough
to plan a run on a model that would not fit in memory.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from torch import nn

from .base import get_method
from .inject import Targets, find_targets, largest_rank, num_params_model

log = logging.getLogger(__name__)

_LORA_BUDGET = re.compile(r"lora(\d+)")


def resolve_budget(model: nn.Module, target_modules: Targets, budget: int | str) -> int:
    """A budget in parameters: an int, a digit string, or "loraN" (LoRA at rank N on these targets)."""
    if isinstance(budget, str):
        text = budget.strip().lower()
        match = _LORA_BUDGET.fullmatch(text)
        if match:
            return num_params_model(model, "lora", target_modules, r=int(match.group(1)))
        if text.isdigit():
            budget = int(text)
    if isinstance(budget, float) and budget.is_integer():
        budget = int(budget)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise ValueError(
            f"budget must be a positive parameter count or 'loraN' (e.g. 'lora8'), got {budget!r}")
    return budget


@dataclass(frozen=True)
class BudgetSolution:
    """The solver's answer: `hp` (the solved knobs), the exact `achieved` count and its error.

    `nearest_below` / `nearest_above` are the closest achievable (hp, count) on each side of the target
    (None where nothing is achievable on that side), so a miss can say what the knobs allow.
    """

    method: str
    target: int
    hp: dict[str, Any]
    achieved: int
    nearest_below: tuple[dict[str, Any], int] | None
    nearest_above: tuple[dict[str, Any], int] | None

    @property
    def rel_error(self) -> float:
        return (self.achieved - self.target) / self.target

    def describe(self) -> str:
        sides = []
        for label, near in (("below", self.nearest_below), ("above", self.nearest_above)):
            if near is not None:
                sides.append(f"{label}: {near[1]} ({(near[1] - self.target) / self.target:+.2%}, {near[0]})")
        return (f"{self.method}: budget {self.target} -> {self.hp} with {self.achieved} parameters "
                f"({self.rel_error:+.2%}); nearest achievable counts " + "; ".join(sides))


def _count_table(name: str, shapes: Counter, fixed: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """(count, knobs) for every candidate setting of the method's knobs.

    Values given for the knobs themselves (e.g. a config's default r) are validated, then ignored:
    the knobs are what the solver searches, so a full method config can be passed as is. Settings that
    `inject` would refuse (an r above a target's `largest_rank`) are not candidates.
    """
    cls = get_method(name)
    base = cls.resolve_hp(fixed)
    ignored = sorted(set(fixed) & set(cls.budget_knobs))
    if ignored:
        log.debug("%s: %s are solved for the budget; the given values are ignored", name, ignored)
    table = []
    top = largest_rank(list(shapes))
    for knobs in cls.budget_candidates(list(shapes), base):
        hp = {**base, **knobs}
        if hp.get("r", 1) > top:
            continue
        table.append((sum(k * cls.num_params(i, o, **hp) for (i, o), k in shapes.items()), knobs))
    return table


def solve_budget_report(model: nn.Module, name: str, target_modules: Targets, budget: int | str,
                        **fixed_hp: Any) -> BudgetSolution:
    """Search the method's `budget_knobs` for the count nearest to `budget` (ties: fewer params).

    `fixed_hp` sets the other hyper-parameters (alpha, dropout, seed, sparse, decompose_both, ...).

    Raises ValueError if the budget is outside the range the method's knobs reach on these targets
    (below the smallest or above the largest achievable count), naming that count.
    """
    target = resolve_budget(model, target_modules, budget)
    shapes = Counter((m.in_features, m.out_features) for m in find_targets(model, target_modules).values())
    table = _count_table(name, shapes, fixed_hp)
    smallest = min(table, key=lambda t: t[0])
    largest = max(table, key=lambda t: t[0])
    if target < smallest[0]:
        raise ValueError(f"budget {target} is below the smallest count {name} can achieve on these targets: "
                         f"{smallest[0]} (with {smallest[1] or fixed_hp})")
    if target > largest[0]:
        raise ValueError(f"budget {target} is above the largest count {name} can achieve on these targets: "
                         f"{largest[0]} (with {largest[1] or fixed_hp})")
    best = min(table, key=lambda t: (abs(t[0] - target), t[0]))
    below = max((t for t in table if t[0] <= target), key=lambda t: t[0], default=None)
    above = min((t for t in table if t[0] >= target), key=lambda t: t[0], default=None)
    return BudgetSolution(name, target, dict(best[1]), best[0],
                          None if below is None else (dict(below[1]), below[0]),
                          None if above is None else (dict(above[1]), above[0]))


def solve_budget(model: nn.Module, name: str, target_modules: Targets, budget: int | str, *,
                 max_rel_error: float | None = None, **fixed_hp: Any) -> dict[str, Any]:
    """The solved knobs only (e.g. {"r": 12}); `{**fixed_hp, **solved}` builds the method.

    A budget outside the achievable range is a ValueError naming the nearest end of it. Inside it, a
    miss larger than 2% is logged with the nearest achievable counts; pass `max_rel_error` to make a
    larger miss a ValueError instead.
    """
    sol = solve_budget_report(model, name, target_modules, budget, **fixed_hp)
    if max_rel_error is not None and abs(sol.rel_error) > max_rel_error:
        raise ValueError(f"cannot reach the budget within {max_rel_error:.1%}: {sol.describe()}")
    if abs(sol.rel_error) > 0.02:
        log.warning("budget miss > 2%%: %s", sol.describe())
    else:
        log.info("%s", sol.describe())
    return sol.hp
