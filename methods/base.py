"""The adapter base class, hyper-parameter validation and the method registry.

Every method is one subclass of `AdapterLayer` that wraps a frozen `nn.Linear`. Shared code (injection,
counting, budgets, saving) only talks to this interface, so adding a method never adds a branch there.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

Validator = Callable[[str, Any], Any]

_REGISTRY: dict[str, type[AdapterLayer]] = {}


def register(name: str) -> Callable[[type[AdapterLayer]], type[AdapterLayer]]:
    """Class decorator: make a method available under `name` (its parameter prefix is `name + "_"`)."""

    def decorate(cls: type[AdapterLayer]) -> type[AdapterLayer]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.method = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available() -> list[str]:
    """Names of the registered methods, in registration order."""
    return list(_REGISTRY)


def get_method(name: str) -> type[AdapterLayer]:
    """The adapter class registered as `name`; a ValueError lists the valid names otherwise."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(available())}")
    return _REGISTRY[name]


# ----------------------------------------------------------------------------- hyper-parameter checks
# Bad hyper-parameter values, wrong type included, are ValueErrors: they come from configs, not code.
def positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{key} must be a positive integer (1, 2, 3, ...), got {value!r}")
    return int(value)


def real_number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    return float(value)


def probability(key: str, value: Any) -> float:
    value = real_number(key, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{key} must be in [0, 1), got {value!r}")
    return value


def boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")  # noqa: TRY004 (config error)
    return value


def integer(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{key} must be an integer, got {value!r}")  # noqa: TRY004 (config error)
    return int(value)


# ----------------------------------------------------------------------------- the base class
class AdapterLayer(nn.Module):
    """A frozen `nn.Linear` plus a trainable update: `layer(x) == F.linear(x, W + dW, bias)`.

    Subclasses declare `hp_spec` (defaults and validators), `num_params` (closed form, so counting and
    budget solving never allocate), create their parameters in `init_adapter`, and define `delta_weight`.
    They may override `adapter_forward` with a factored form that avoids materialising dW.
    """

    method: ClassVar[str] = ""
    #: hyper-parameters the budget solver searches (values passed for them are overridden).
    budget_knobs: ClassVar[tuple[str, ...]] = ("r",)
    #: hyper-parameter name -> (default, validator); `r`, `alpha` and `dropout` are common to all methods.
    hp_spec: ClassVar[dict[str, tuple[Any, Validator]]] = {}

    def __init__(self, base_layer: nn.Linear, *, shared: nn.Module | None = None, **hp: Any) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"{self.method} wraps nn.Linear modules, got {type(base_layer).__name__}")
        self.hp = self.resolve_hp(hp)
        self.base_layer = base_layer.requires_grad_(False)
        self.scaling = self.hp["alpha"] / self.hp["r"]
        p = self.hp["dropout"]
        self.adapter_dropout = nn.Dropout(p) if p > 0 else nn.Identity()
        self.merged = False
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.init_adapter(factory, shared)
        self.reset_adapter()

    # -- what a method defines ------------------------------------------------------------------------
    @classmethod
    def num_params(cls, in_features: int, out_features: int, **hp: Any) -> int:
        """Trainable parameters this method adds to Linear(in_features, out_features); hp are resolved."""
        raise NotImplementedError

    @classmethod
    def max_rank(cls, in_features: int, out_features: int, **hp: Any) -> int:
        """Structural upper bound on rank(dW), reached by generic (random) adapter weights."""
        return min(in_features, out_features)

    @classmethod
    def make_shared(cls, linears: list[nn.Linear], hp: dict[str, Any]) -> nn.Module | None:
        """State shared by all layers of one injection (RandLoRA's random bases); None by default."""
        return None

    @classmethod
    def budget_candidates(cls, shapes: list[tuple[int, int]], fixed: dict[str, Any]) -> Iterable[dict]:
        """Settings of `budget_knobs` the solver may choose from, given the (in, out) shapes and the
        resolved non-knob hp."""
        top = max(max(i, o) for i, o in shapes)
        return [{"r": r} for r in range(1, top + 1)]

    def init_adapter(self, factory: dict[str, Any], shared: nn.Module | None) -> None:
        """Create the adapter parameters (uninitialised) on the base layer's device and dtype."""
        raise NotImplementedError

    def reset_adapter(self) -> None:
        """Initialise the adapter so that dW == 0 (outputs unchanged at the start of training)."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """dW (out x in), scaling included."""
        raise NotImplementedError

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """dW applied to (already dropped-out) x; override with a factored form where one exists."""
        return F.linear(x, self.delta_weight())

    # -- shared behaviour -----------------------------------------------------------------------------
    @classmethod
    def resolve_hp(cls, hp: dict[str, Any]) -> dict[str, Any]:
        """Defaults filled in and every value validated; unknown names are errors, not silently ignored."""
        unknown = sorted(set(hp) - set(cls.hp_spec))
        if unknown:
            raise ValueError(
                f"unknown hyper-parameter(s) {unknown} for {cls.method}; valid: {sorted(cls.hp_spec)}"
            )
        resolved = {}
        for key, (default, check) in cls.hp_spec.items():
            resolved[key] = check(key, hp.get(key, default))
        return resolved

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The (frozen) base weight, for code that inspects `module.weight` of a Linear."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def adapter_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of the trainable adapter tensors, base layer excluded."""
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("base_layer.")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        dtype = self.base_layer.weight.dtype
        return out + self.adapter_forward(self.adapter_dropout(x.to(dtype))).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Add dW into the base weight; the adapter path is then skipped (no double counting)."""
        if not self.merged:
            weight = self.base_layer.weight
            weight += self.delta_weight().to(weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract dW again, restoring the base weight up to rounding."""
        if self.merged:
            weight = self.base_layer.weight
            weight -= self.delta_weight().to(weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        hp = ", ".join(f"{k}={v}" for k, v in self.hp.items())
        return f"{self.method}: {hp}, merged={self.merged}"


def common_hp(alpha: float) -> dict[str, tuple[Any, Validator]]:
    """`r`, `alpha`, `dropout` with a method's default alpha (PEFT's defaults differ per method)."""
    return {"r": (8, positive_int), "alpha": (alpha, real_number), "dropout": (0.0, probability)}
