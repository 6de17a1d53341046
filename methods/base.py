"""The adapter base class, hyper-parameter validation and the method registry.

Every method is one subclass of `AdapterLayer` that wraps a frozen `nn.Linear`. Shared code (injection,
counting, budgets, saving) only talks to this interface, so adding a method never adds a branch there.
This module is the contract a method fulfils; how fast a call runs is elsewhere and optional: which path
a call takes (factored or merged, by multiply-adds) in methods/costmodel.py, the merged path itself (one
autograd function, dW kept across calls) in methods/fastpath.py.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .costmodel import CostModel
from .fastpath import DeltaCache, autocast_dtype  # noqa: F401  (autocast_dtype: re-exported)
from .peft_spec import PeftSpec

Validator = Callable[[str, Any], Any]

_REGISTRY: dict[str, type[AdapterLayer]] = {}


def register(name: str) -> Callable[[type[AdapterLayer]], type[AdapterLayer]]:
    """Class decorator: make a method available under `name` (its parameter prefix is `name + "_"`)."""

    def decorate(cls: type[AdapterLayer]) -> type[AdapterLayer]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name].__name__}")
        if not cls.label:
            raise ValueError(f"{cls.__name__} needs a `label` (the name figures show) to be registered")
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
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def one_of(*valid: str) -> Validator:
    """A validator accepting exactly the strings `valid` (e.g. an init convention)."""

    def check(key: str, value: Any) -> str:
        if value not in valid:
            raise ValueError(f"{key} must be one of {', '.join(valid)}, got {value!r}")
        return value

    return check


def integer(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------- the base class
def adapter_dtype_for(base_dtype: torch.dtype) -> torch.dtype:
    """Adapters of a half-precision (bf16/fp16) base are kept in fp32; otherwise the base dtype."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


class AdapterLayer(CostModel, nn.Module):
    """A frozen `nn.Linear` plus a trainable update: `layer(x) == F.linear(x, W + dW, bias)`.

    Subclasses declare `hp_spec` (defaults and validators), `num_params` (closed form, so counting and
    budget solving never allocate), create their parameters in `init_adapter`, and define `delta_weight`.
    They may override `adapter_forward` with a factored form that avoids materialising dW, and, for speed
    only, the cost model and merged-path hooks of the `CostModel` mixin (methods/costmodel.py).
    """

    method: ClassVar[str] = ""
    #: the name figures and tables show (the method's own paper spelling)
    label: ClassVar[str] = ""
    #: the method's Hugging Face PEFT counterpart (export, bench and parity tests read it;
    #: methods/peft_spec.py)
    peft: ClassVar[PeftSpec]
    #: hyper-parameters the budget solver searches (values passed for them are overridden).
    budget_knobs: ClassVar[tuple[str, ...]] = ("r",)
    #: `max_rank` is the rank random adapter weights reach (True), or only an upper bound
    #: (FourierFT's spectrum)
    max_rank_exact: ClassVar[bool] = True
    #: why `trainer.compile` must not compile this method's layers (they train eager, saying so); None: it may
    compile_refusal: ClassVar[str | None] = None
    #: `path_macs` describes this layer's forward (False: PEFT-backed layers run PEFT's own)
    has_cost_model: ClassVar[bool] = True
    #: layers may take their own `r` (a `rank_pattern`) when the budget solver needs it
    layer_patterns: ClassVar[bool] = True
    #: hyper-parameter name -> (default, validator); `r`, `alpha` and `dropout` are common to all methods.
    hp_spec: ClassVar[dict[str, tuple[Any, Validator]]] = {}
    #: the model-wide hyper-parameters, set by `inject` (save_adapter records them with the layers
    #: whose r differs)
    global_hp: dict[str, Any]

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
        #: False: dW is applied but its parameters get no gradient (counted, in the optimizer, never moved),
        #: as the official RandLoRA CLIP code's attention adapters (see `untrained_forward`)
        self.update_trained = True
        self.delta_cache = DeltaCache()   # dW kept from forward to backward and across micro-batches
        # Like PEFT's autocast_adapter_dtype: adapters of a bf16/fp16 base train in fp32 (half-precision
        # Adam updates of tiny scalings round to zero); inputs are cast to it on the way in.
        self.adapter_dtype = adapter_dtype_for(base_layer.weight.dtype)
        factory = {"device": base_layer.weight.device, "dtype": self.adapter_dtype}
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
    def tensor_shapes(cls, shape: tuple[int, int],
                      hp: dict[str, Any]) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """(name, shape) of the adapter tensors on Linear(*shape) with resolved `hp`: the method's structure.
        Built on the meta device, so nothing is allocated."""
        layer = cls(nn.Linear(*shape, device="meta"), **hp)  # adapters follow the base's device
        return tuple((n, tuple(p.shape)) for n, p in layer.adapter_parameters())

    #: why `knob_limit` bounds r (the refusal says it)
    knob_limit_reason: ClassVar[str] = "a rank above a layer's larger dimension adds parameters but no rank"

    @classmethod
    def knob_limit(cls, in_features: int, out_features: int) -> int:
        """The largest valid `r` on Linear(in, out): its larger dimension (a rank above it adds parameters
        but no rank or structure); a method whose `r` is no rank (FourierFT's frequencies) says otherwise."""
        return max(in_features, out_features)

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
        factors = self.adapter_factors(x)
        if factors is not None:
            return F.linear(*factors)
        return F.linear(x, self.delta_weight())

    def adapter_factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(h, R) with x dW^T == h R^T (h: tokens x k, R: out x k, scale folded in), for methods whose
        last factored step is one matmul: the base class then accumulates h R^T straight into the base
        output (one GEMM with accumulation, no separate tokens x out sum). None: no such form.

        For thin k, give R as a transposed view of a contiguous (k x out) tensor: backward's input
        gradient g @ R then reads R column-major, which MKL runs up to 2x faster than a row-major R
        (k <= 8 on the 2-core AVX-512 dev machine: LoRA-8 on a ViT-B block went from 1.16x to 1.11x the
        frozen floor)."""
        return None

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """`layer(x)` (base and factored adapter together) as one custom autograd function, for methods
        whose factored form has intermediates autograd would keep or copy needlessly; called only when
        the adapter sees the base layer's own input. None: no such form (the default)."""
        return None

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
        if self.merged:
            return self.base_layer(x)
        if not self.update_trained:
            return self.untrained_forward(x)
        return self.routed_forward(x)   # the factored or the merged path, see methods/costmodel.py

    def untrained_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (W + dW)^T + b with dW outside the graph: the input still gets its gradient, the adapter's
        parameters none. The official RandLoRA CLIP code writes W + dW into its attention weight through
        `.data` (vision_language/src/rand_lora.py:582-584), which has this effect on its attention
        adapters."""
        weight = self.base_layer.weight
        with torch.no_grad():
            adapted = weight + self.delta_weight().to(weight.dtype)
        return F.linear(x, adapted, self.base_layer.bias)

    def train(self, mode: bool = True) -> AdapterLayer:
        """Switching between training and evaluation drops a kept dW (see `keeps_delta`)."""
        self.delta_cache.clear()
        return super().train(mode)

    @torch.no_grad()
    def merge(self) -> None:
        """Add dW into the base weight; the adapter path is then skipped (no double counting)."""
        self.delta_cache.clear()
        if not self.merged:
            weight = self.base_layer.weight
            weight += self.delta_weight().to(weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract dW again, restoring the base weight up to rounding."""
        self.delta_cache.clear()
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
