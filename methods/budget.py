"""Parameter budgets: "what LoRA rank N costs", and each method's knobs that land on it.

Only Linear shapes are needed, so a model built on the `meta` device (no weights allocated) is enough
to plan a run on a model that would not fit in memory.

The solver first picks one global setting of the method's `budget_knobs` (e.g. r, LoKr's factor), then,
when that misses the budget by more than `EXACT`, gives some layers another r (a `rank_pattern`, see
methods/inject.py): r +- `STEP`, or the r of the nearest global setting on the other side of the target.
Every count here is a sum of per-layer closed forms, so this is a small bounded subset sum over groups
of same-shaped layers (a greedy fit with a polish, `_fit`). A layer takes another r only where that keeps
its structure (the same adapter tensors: LoKr's W2 stays low rank; RandLoRA stays full rank with
n = ceil(min(in, out) / r) bases of its own r). Misses beyond `TOLERANCE` are reported, not hidden.
"""
from __future__ import annotations

import functools
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .base import get_method
from .inject import RANK_PATTERN, Targets, find_targets, largest_rank, num_params_model, split_pattern

log = logging.getLogger(__name__)

_LORA_BUDGET = re.compile(r"lora(\d+)")
#: Issue 13: every method within 1% of every budget its structure can reach.
TOLERANCE = 0.01
#: Misses this small count as exact: the solver then prefers fewer layers with their own r.
EXACT = TOLERANCE / 10
#: global settings per side of the target that per-layer steps start from
BRACKET = 3
#: per-layer steps tried: r - STEP .. r + STEP
STEP = 2
#: the budget value meaning "the method's own default count": its configured hyper-parameters, unsolved.
NATIVE = "native"
#: the knob that may differ per layer (the rank_pattern's values)
LAYER_KNOB = "r"

Shape = tuple[int, int]


def is_native(budget: Any) -> bool:
    return isinstance(budget, str) and budget.strip().lower() == NATIVE


def resolve_budget(model: nn.Module, target_modules: Targets, budget: int | float | str, *,
                   method: str | None = None, hp: dict[str, Any] | None = None) -> int:
    """A budget in parameters: an int, a digit string, "loraN" (LoRA at rank N on these targets), or
    "native" (`method`'s count at its configured `hp`: where the method is used when nobody equalises)."""
    if is_native(budget):
        if method is None:
            raise ValueError("budget 'native' is a method's own count at its configured hyper-parameters; "
                             "it needs the method (valid without one: a parameter count or 'loraN')")
        return num_params_model(model, method, target_modules, **(hp or {}))
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
        raise ValueError(f"budget must be a positive parameter count, 'loraN' (e.g. 'lora8') or 'native', "
                         f"got {budget!r}")
    return budget


@dataclass(frozen=True)
class BudgetSolution:
    """The solver's answer: `hp` (the solved knobs, with a `rank_pattern` when some layers have their own
    r), the exact `achieved` count and its error.

    `nearest_below` / `nearest_above` are the closest (hp, count) one global setting of the knobs achieves
    on each side of the target (None where nothing is achievable on that side), so a miss can say what
    the knobs allow. `structure` records what was built per layer shape ("in x out" -> adapter tensor
    shapes at the global knobs), e.g. which Kronecker factorization LoKr got.
    """

    method: str
    target: int
    hp: dict[str, Any]
    achieved: int
    nearest_below: tuple[dict[str, Any], int] | None
    nearest_above: tuple[dict[str, Any], int] | None
    structure: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    @property
    def rel_error(self) -> float:
        return (self.achieved - self.target) / self.target

    @property
    def reached(self) -> bool:
        """Within `TOLERANCE` of the target: the point may be compared as an equal budget."""
        return abs(self.rel_error) <= TOLERANCE

    @property
    def rank_pattern(self) -> dict[str, int]:
        return {name: own[LAYER_KNOB] for name, own in split_pattern(self.hp)[1].items()}

    @property
    def per_layer(self) -> dict[str, dict[str, int]]:
        """{layer: {knob: value}} for the layers whose knob differs from the global one."""
        return {name: {LAYER_KNOB: r} for name, r in self.rank_pattern.items()}

    def plan(self) -> str:
        """The knobs in words: global values, then how many layers have which other r."""
        knobs = split_pattern(self.hp)[0]
        extra = Counter(self.rank_pattern.values())
        return f"{knobs}" + "".join(f" + {k} layers at r={r}" for r, k in sorted(extra.items()))

    def describe(self) -> str:
        sides = []
        for label, near in (("below", self.nearest_below), ("above", self.nearest_above)):
            if near is not None:
                sides.append(f"{label}: {near[1]} ({(near[1] - self.target) / self.target:+.2%}, {near[0]})")
        return (f"{self.method}: budget {self.target} -> {self.plan()} with {self.achieved} parameters "
                f"({self.rel_error:+.2%}); nearest counts of one global setting: " + "; ".join(sides))


# ----------------------------------------------------------------------------- global knobs
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
    return list(_table(name, tuple(sorted(shapes.items())), tuple(sorted(base.items()))))


@functools.lru_cache(maxsize=64)
def _table(name: str, shapes: tuple[tuple[Shape, int], ...],
           base_items: tuple) -> tuple[tuple[int, dict], ...]:
    """`_count_table`, cached: a sweep solves many budgets on one model (callers copy the knobs)."""
    cls, base = get_method(name), dict(base_items)
    table = []
    top = largest_rank([s for s, _ in shapes], name)
    for knobs in cls.budget_candidates([s for s, _ in shapes], base):
        hp = {**base, **knobs}
        if hp.get("r", 1) > top:
            continue
        table.append((sum(k * cls.num_params(i, o, **hp) for (i, o), k in shapes), knobs))
    return tuple(table)


def _brackets(table: list[tuple[int, dict[str, Any]]], target: int) -> list[list[tuple[int, dict[str, Any]]]]:
    """For each setting of the knobs other than r (LoKr's factor), the `BRACKET` nearest counts below and
    above the target (several: RandLoRA's count is not monotone in r, so the nearest r may have no useful
    steps). Settings whose counts equal an earlier one's for every r (LoKr factors that split these
    shapes alike) are left out: they can only tie."""
    groups: dict[tuple, list[tuple[int, dict[str, Any]]]] = {}
    for count, knobs in table:
        groups.setdefault(tuple(sorted((k, v) for k, v in knobs.items() if k != LAYER_KNOB)), []).append(
            (count, knobs))
    out, seen = [], set()
    for rows in groups.values():
        counts = tuple((c, k.get(LAYER_KNOB)) for c, k in rows)
        if counts in seen:
            continue
        seen.add(counts)
        below = sorted((t for t in rows if t[0] <= target), key=lambda t: -t[0])
        above = sorted((t for t in rows if t[0] > target), key=lambda t: t[0])
        out.append(below[:BRACKET] + above[:BRACKET])
    return out


# ----------------------------------------------------------------------------- per-layer refinement
@functools.lru_cache(maxsize=8192)
def _tensor_shapes(name: str, shape: Shape, hp_items: tuple) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The adapter tensors (name, shape) `name` creates on Linear(*shape) with these hp: its structure.
    Built on the meta device, so nothing is allocated."""
    return get_method(name).tensor_shapes(shape, dict(hp_items))


def _same_structure(name: str, shape: Shape, hp: dict[str, Any], r: int) -> bool:
    """Layer `shape` keeps its adapter tensors (by name) when its r becomes `r`."""
    def names(h: dict[str, Any]) -> set[str]:
        return {n for n, _ in _tensor_shapes(name, shape, tuple(sorted(h.items())))}

    return names({**hp, LAYER_KNOB: r}) == names(hp)


def structure(name: str, shape: Shape, hp: dict[str, Any]) -> dict[str, list[int]]:
    """Adapter tensor name -> shape of `name` on Linear(*shape) with resolved `hp` (e.g. LoKr's factors)."""
    return {n: list(s) for n, s in _tensor_shapes(name, shape, tuple(sorted(hp.items())))}


def _layer_steps(name: str, shape: Shape, hp: dict[str, Any], others: set[int]) -> list[tuple[int, int]]:
    """(r', count change) on one layer of `shape` for r' in r - STEP .. r + STEP and `others` (the r of
    nearby global settings), where r' is valid there and changes its count. Whether r' keeps the
    layer's structure is checked only for the steps a fit chooses (`_refine`): it builds a meta layer."""
    cls = get_method(name)
    r, here = hp[LAYER_KNOB], cls.num_params(*shape, **hp)
    steps = []
    for other in sorted(others | set(range(r - STEP, r + STEP + 1)) - {r}):
        if 1 <= other <= largest_rank([shape], name):
            try:
                delta = cls.num_params(*shape, **{**hp, LAYER_KNOB: other}) - here
            except ValueError:
                # a value the method refuses on this shape (OFT: a block size not dividing in)
                continue
            steps += [(other, delta)] if delta else []
    return steps


Group = tuple[int, list[tuple[int, int]]]  # (layers of this shape, their (r', delta) steps)
Choice = list[tuple[int, int, int]]        # per group: (r', delta, how many layers take it)


def _greedy(residual: int, groups: list[Group], fixed: dict[int, tuple[int, int, int]]) -> tuple[int, Choice]:
    """Coarse to fine (largest step first): each group takes the step and count that best shrink
    `residual`; groups in `fixed` keep the given choice. Returns (what is left, the choices)."""
    choice: Choice = [(0, 0, 0)] * len(groups)
    order = sorted(range(len(groups)), key=lambda g: -max((abs(d) for _, d in groups[g][1]), default=0))
    for g in order:
        k, steps = groups[g]
        best = fixed.get(g, (0, 0, 0))
        if g not in fixed:
            for r, d in steps:
                x = max(0, min(k, round(residual / d)))
                if abs(residual - x * d) < abs(residual - best[1] * best[2]):
                    best = (r, d, x)
        choice[g] = best
        residual -= best[1] * best[2]
    return residual, choice


def _fit(residual: int, groups: list[Group], slack: int) -> Choice:
    """The greedy fit, then one polish: each group's count moved by up to 2 with the others refitted.
    Any fit within `slack` counts as exact: then the fewest layers moved wins."""
    def key(rest: int, choice: Choice) -> tuple[int, int, int]:
        return max(abs(rest), slack), _moved(choice), abs(rest)

    left, best = _greedy(residual, groups, {})
    if abs(left) <= slack:
        return best
    for g, (k, steps) in enumerate(groups):
        for r, d in steps:
            x0 = best[g][2] if best[g][0] == r else 0
            for x in range(max(0, x0 - 2), min(k, x0 + 2) + 1):
                rest, choice = _greedy(residual, groups, {g: (r, d, x)})
                if key(rest, choice) < key(left, best):
                    left, best = rest, choice
    return best


def _moved(choice: Choice) -> int:
    return sum(x for _, _, x in choice)


def _spread(names: list[str], x: int) -> list[str]:
    """x of `names` (model order) spread evenly over the depth: index floor((2i + 1) k / 2x), i < x."""
    k = len(names)
    return [names[(2 * i + 1) * k // (2 * x)] for i in range(x)]


def _refine(name: str, layers: dict[str, Shape], hp: dict[str, Any], count: int, target: int,
            others: set[int]) -> tuple[int, dict[str, int]]:
    """(count, rank_pattern) nearest to `target` from the global `hp`, some layers taking another r
    (`_layer_steps`); which layers of a shape take it: spread evenly over the depth (`_spread`)."""
    cls = get_method(name)
    if LAYER_KNOB not in cls.budget_knobs or not cls.layer_patterns or abs(count - target) <= EXACT * target:
        return count, {}
    by_shape: dict[Shape, list[str]] = {}
    for layer, shape in layers.items():
        by_shape.setdefault(shape, []).append(layer)
    shapes = list(by_shape)
    groups = [(len(by_shape[s]), _layer_steps(name, s, hp, others)) for s in shapes]
    while True:  # drop chosen steps that would change a layer's structure, and fit again
        fit = _fit(target - count, groups, int(EXACT * target))
        bad = [g for g, (r, _, x) in enumerate(fit) if x and not _same_structure(name, shapes[g], hp, r)]
        if not bad:
            break
        for g in bad:
            groups[g] = (groups[g][0], [step for step in groups[g][1] if step[0] != fit[g][0]])
    pattern: dict[str, int] = {}
    for s, (r, d, x) in zip(shapes, fit, strict=True):
        pattern.update({layer: r for layer in _spread(by_shape[s], x)} if x else {})
        count += d * x
    return count, pattern


# ----------------------------------------------------------------------------- the solver
def solve_budget_report(model: nn.Module, name: str, target_modules: Targets, budget: int | str, *,
                        per_layer: bool = True, **fixed_hp: Any) -> BudgetSolution:
    """The plan whose exact count is nearest to `budget`: global knobs plus, where needed, per-layer r.

    `fixed_hp` sets the other hyper-parameters (alpha, dropout, seed, sparse, decompose_both, ...).
    Among plans within `TOLERANCE`, one that keeps the configured values of the knobs other than r (LoKr's
    factor) is preferred, then the smallest error (below `EXACT` all count as exact), then the fewest
    layers with their own r. "native" is the configured hp themselves, unsolved. `per_layer=False`: one
    global setting only, no rank_pattern (for comparisons with implementations that have none, e.g.
    PEFT's RandLoRA and VeRA configs).

    Raises ValueError if the budget is outside the range the method's knobs reach on these targets
    (below the smallest or above the largest count of one global setting), naming that count.
    """
    fixed_hp, _ = split_pattern(fixed_hp)  # a pattern in the config is the solver's to choose
    layers = {n: (m.in_features, m.out_features) for n, m in find_targets(model, target_modules).items()}
    if is_native(budget):
        return _native(name, layers, fixed_hp, resolve_budget(model, target_modules, budget, method=name,
                                                                hp=fixed_hp))
    target = resolve_budget(model, target_modules, budget)
    if not get_method(name).budget_knobs:
        fixed = num_params_model(model, name, target_modules, **fixed_hp)
        raise ValueError(f"{name} has no size knob (its count is fixed by the targets: {fixed} here), "
                         f"so it runs "
                         f"at budget=native only, not {budget}")
    table = _count_table(name, Counter(layers.values()), fixed_hp)
    smallest = min(table, key=lambda t: t[0])
    largest = max(table, key=lambda t: t[0])
    if target < smallest[0]:
        raise ValueError(f"budget {target} is below the smallest count {name} can achieve on these targets: "
                         f"{smallest[0]} (with {smallest[1] or fixed_hp})")
    if target > largest[0]:
        raise ValueError(f"budget {target} is above the largest count {name} can achieve on these targets: "
                         f"{largest[0]} (with {largest[1] or fixed_hp})")
    base = get_method(name).resolve_hp(fixed_hp)
    plans = _plans(name, layers, base, table, target) if per_layer else [(c, dict(k), {}) for c, k in table]
    best = min(plans, key=lambda p: _rank(p, base, target))
    below = max((t for t in table if t[0] <= target), key=lambda t: t[0], default=None)
    above = min((t for t in table if t[0] >= target), key=lambda t: t[0], default=None)
    count, knobs, pattern = best
    return BudgetSolution(name, target, {**knobs, **({RANK_PATTERN: pattern} if pattern else {})}, count,
                          None if below is None else (dict(below[1]), below[0]),
                          None if above is None else (dict(above[1]), above[0]),
                          _structures(name, layers, {**base, **knobs}))


def _plans(name: str, layers: dict[str, Shape], base: dict[str, Any], table: list, target: int) -> list:
    """(count, knobs, rank_pattern) refined from each bracketing global setting, its layers free to take
    the r of the nearest global settings below and above the target (or r +- `STEP`). A setting whose
    counts all lie on one side of the target (LoKr factors that saturate below it) is tried as it is."""
    plans = []
    for near in _brackets(table, target):
        sides = (max((t for t in near if t[0] <= target), key=lambda t: t[0], default=None),
                 min((t for t in near if t[0] > target), key=lambda t: t[0], default=None))
        others = {t[1][LAYER_KNOB] for t in sides if t is not None and LAYER_KNOB in t[1]}
        for count, knobs in near:
            refined, pattern = (_refine(name, layers, {**base, **knobs}, count, target, others)
                                if None not in sides else (count, {}))
            plans.append((refined, dict(knobs), pattern))
    return plans


def _rank(plan: tuple[int, dict[str, Any], dict[str, int]], base: dict[str, Any], target: int) -> tuple:
    count, knobs, pattern = plan
    error = abs(count - target) / target
    own = all(base[k] == v for k, v in knobs.items() if k != LAYER_KNOB)
    return (error > TOLERANCE, error <= TOLERANCE and not own, max(error, EXACT), len(pattern), error, count)


def _structures(name: str, layers: dict[str, Shape], hp: dict[str, Any]) -> dict[str, dict[str, list[int]]]:
    return {f"{i}x{o}": structure(name, (i, o), hp) for i, o in dict.fromkeys(layers.values())}


def _native(name: str, layers: dict[str, Shape], fixed_hp: dict[str, Any], count: int) -> BudgetSolution:
    """The configured knobs as they are: target and achieved are the method's own count."""
    cls = get_method(name)
    hp = cls.resolve_hp(fixed_hp)
    knobs = {k: hp[k] for k in cls.budget_knobs}
    return BudgetSolution(name, count, knobs, count, (knobs, count), (knobs, count),
                          _structures(name, layers, hp))


def solve_budget(model: nn.Module, name: str, target_modules: Targets, budget: int | str, *,
                 max_rel_error: float | None = None, per_layer: bool = True,
                 **fixed_hp: Any) -> dict[str, Any]:
    """The solved knobs only (e.g. {"r": 12}, or {"r": 12, "rank_pattern": {...}}), which
    `inject(model, name, target_modules, **fixed_hp, **solved)` accepts.

    A budget outside the achievable range is a ValueError naming the nearest end of it. Inside it, a
    miss larger than `TOLERANCE` is logged with the nearest achievable counts; pass `max_rel_error` to
    make a larger miss a ValueError instead.
    """
    sol = solve_budget_report(model, name, target_modules, budget, per_layer=per_layer, **fixed_hp)
    if max_rel_error is not None and abs(sol.rel_error) > max_rel_error:
        raise ValueError(f"cannot reach the budget within {max_rel_error:.1%}: {sol.describe()}")
    if sol.reached:
        log.info("%s", sol.describe())
    else:
        log.warning("budget not reached within %.0f%%: %s", TOLERANCE * 100, sol.describe())
    return sol.hp
