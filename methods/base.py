"""The adapter base class, hyper-parameter validation and the method registry.

Every method is one subclass of `AdapterLayer` that wraps a frozen `nn.Linear`. Shared code (injection,
counting, budgets, saving) only talks to this interface, so adding a method never adds a branch there.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

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
def adapter_dtype_for(base_dtype: torch.dtype) -> torch.dtype:
    """Adapters of a half-precision (bf16/fp16) base are kept in fp32; otherwise the base dtype."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


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

    # -- cost model (multiply-adds), used to pick the cheaper of the factored and the merged path --------
    def factored_macs(self, tokens: int) -> int | None:
        """Multiply-adds of one `adapter_forward` over `tokens` rows; None if it has no factored form."""
        return None

    def delta_macs(self) -> int:
        """Multiply-adds of one `delta_weight()` (building dW)."""
        return self.out_features * self.in_features

    def path_macs(self, tokens: int, grad: bool, joins_base: bool = True) -> tuple[float, int]:
        """Multiply-adds the adapter adds to one call over `tokens` rows: (factored path, merged path).

        Factored: the adapter's own forward F per call, ~3F with its backward (input and parameter grads);
        infinite for a method without one. Merged: the base matmul absorbs dW, so a forward costs only
        building dW (D); training adds the weight-shaped gradient G = g^T x (tokens * out * in) and D to
        rebuild dW plus ~2D to backpropagate G into the factors (dW is rebuilt rather than kept in the
        graph: no out x in tensor per layer). When dW cannot join the base matmul (`joins_base` False:
        adapter dropout, autocast), x dW^T and its input gradient are two more tokens * out * in each.
        """
        factored = self.factored_macs(tokens)
        factored = math.inf if factored is None else factored * (3 if grad else 1)
        build, dense = self.delta_macs(), tokens * self.out_features * self.in_features
        merged = dense + 4 * build if grad else build
        if not joins_base:
            merged += 2 * dense if grad else dense
        return factored, merged

    def use_merged_path(self, tokens: int, grad: bool, joins_base: bool = True) -> bool:
        """Whether materialising dW beats the factored form for this call (see `path_macs`)."""
        factored, merged = self.path_macs(tokens, grad, joins_base)
        return merged < factored

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
        tokens = x.numel() // max(1, x.shape[-1])
        grad = torch.is_grad_enabled() and any(p.requires_grad for _, p in self.adapter_parameters())
        half, shares = autocast_dtype(x), self.shares_input(x)
        fusable = shares and half is None                  # == self.joins_base(x)
        if self.use_merged_path(tokens, grad, joins_base=fusable):
            if fusable:                                    # dW rides in the base matmul
                return merged_linear(self, x)
            out = self.base_layer(x)                       # dropout or autocast: x dW^T on its own
            xa = self.adapter_dropout(x.to(self.adapter_dtype))
            return out + merged_linear(self, xa, alone=True).to(out.dtype)
        if shares:
            fused = self.fused_forward(x)
            if fused is not None:
                return fused
        # in-place accumulation needs one dtype throughout; under autocast (with explicit casts) it was a
        # few % faster but kept two more activations than PEFT on MiniLM, so the sum below is used there
        if x.dtype == self.base_layer.weight.dtype == self.adapter_dtype and half is None:
            x2 = x.reshape(-1, x.shape[-1])
            factors = self.adapter_factors(self.adapter_dropout(x2))
            if factors is not None:   # base GEMM, then h R^T accumulated in place into its fresh output
                out = self.base_layer(x2)
                return out.addmm_(*factors[:1], factors[1].T).view(*x.shape[:-1], out.shape[-1])
        out = self.base_layer(x)
        return out + self.adapter_forward(self.adapter_dropout(x.to(self.adapter_dtype))).to(out.dtype)

    def delta_split(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(P, Q) with dW = P Q and Q frozen, for the merged path (which saves x Q^T for backward);
        default (dW, None): Q is the identity and x is saved."""
        return self.delta_weight(), None

    def shares_input(self, x: torch.Tensor) -> bool:
        """The adapter sees the base layer's own input: no active dropout, and one dtype throughout or
        autocast (which runs both in its dtype). Required by `fused_forward`."""
        no_dropout = isinstance(self.adapter_dropout, nn.Identity) or not self.training
        same_dtype = x.dtype == self.base_layer.weight.dtype == self.adapter_dtype
        return no_dropout and (same_dtype or torch.is_autocast_enabled(x.device.type))

    def joins_base(self, x: torch.Tensor) -> bool:
        """dW can join the base matmul: the same input, and no autocast (in bf16, W + dW would round a
        small update away)."""
        return self.shares_input(x) and autocast_dtype(x) is None

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


# ----------------------------------------------------------------------------- the merged training path
class _MergedLinear(torch.autograd.Function):
    """y = x (W + dW)^T + b in one matmul (W None: y = x dW^T); backward rebuilds dW instead of keeping
    it in the graph.

    With `layer.delta_split()` = (P, Q), dW = P Q where Q is frozen (None: the identity). Saved for
    backward: u = x Q^T (x itself by default) -- never anything weight-shaped. Backward computes
    grad_x = g (W + dW) and pushes g^T u through P with autograd, so every method gets a correct merged
    path from `delta_weight` alone, and a method with a frozen right factor saves less. Under autocast
    (W None only) backward re-enters the forward's autocast, so its matmuls see the same dtypes.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                layer: AdapterLayer, *params: torch.Tensor) -> torch.Tensor:
        left, right = layer.delta_split()
        ctx.layer, ctx.x_shape, ctx.autocast = layer, x.shape, _autocast_state()
        u = x if right is None else x @ right.T
        half = autocast_dtype(x)
        if half is not None:   # backward's g^T u runs in the autocast dtype anyway: keep u in it
            u = u.to(half)
        ctx.save_for_backward(u, weight, x if ctx.needs_input_grad[1] and right is not None else None)
        dw = left if right is None else layer.delta_weight()
        return F.linear(x, dw if weight is None else weight + dw, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        with contextlib.ExitStack() as stack:
            for device, dtype in ctx.autocast:
                stack.enter_context(torch.autocast(device, dtype=dtype))
            return _MergedLinear._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        u, weight, x = ctx.saved_tensors
        layer: AdapterLayer = ctx.layer
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        params = [p for _, p in layer.adapter_parameters()]
        trained = [p for p, need in zip(params, ctx.needs_input_grad[4:]) if need]
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        with torch.enable_grad():
            left, right = layer.delta_split()
        dw = left.detach() if right is None else layer.delta_weight().detach()
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = (g2 @ (dw if weight is None else weight + dw)).view(ctx.x_shape)
        if need_w:                                         # G (out x in): the gradient of W
            grad_w = g2.T @ (u if right is None else x).reshape(-1, ctx.x_shape[-1])
        if trained:   # g^T u: the gradient of P (equal to G when Q is the identity)
            grad_left = grad_w if grad_w is not None and right is None else g2.T @ u.reshape(-1, u.shape[-1])
            grads = iter(torch.autograd.grad(left, trained, grad_left))
        if need_b:
            grad_b = g2.sum(0)
        param_grads = [next(grads) if need else None for need in ctx.needs_input_grad[4:]]
        return (grad_x, grad_w, grad_b, None, *param_grads)


def merged_linear(layer: AdapterLayer, x: torch.Tensor, alone: bool = False) -> torch.Tensor:
    """`layer(x)` through `_MergedLinear` (the base layer's weight and bias, the adapter's parameters);
    `alone`: only the update, x dW^T."""
    base = layer.base_layer
    params = [p for _, p in layer.adapter_parameters()]
    if alone:
        return _MergedLinear.apply(x, None, None, layer, *params)
    return _MergedLinear.apply(x, base.weight, base.bias, layer, *params)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes in on x's device, None when autocast is off there."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _autocast_state() -> list[tuple[str, torch.dtype]]:
    """(device type, dtype) of every autocast region active now. Autograd runs a custom backward with
    autocast off, so a backward that mixes saved half-precision tensors with fp32 weights re-enters these."""
    return [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]


def common_hp(alpha: float) -> dict[str, tuple[Any, Validator]]:
    """`r`, `alpha`, `dropout` with a method's default alpha (PEFT's defaults differ per method)."""
    return {"r": (8, positive_int), "alpha": (alpha, real_number), "dropout": (0.0, probability)}
