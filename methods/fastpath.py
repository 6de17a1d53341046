"""The merged training path: x (W + dW)^T in one matmul, with dW built once per optimizer step.

A full-rank update (RandLoRA; LoHa at large r) is cheapest merged into the frozen matmul: its forward
costs one build of dW and its parameter gradient starts from the weight gradient G = g^T x that full
fine-tuning computes too. What it costs beyond that is decided here:

* the parameter gradient: a method with a closed form (`AdapterLayer.delta_param_grads`, RandLoRA's one
  projection B^T G) skips the autograd rebuild of dW's graph that every other method gets;
* the input gradient g (W + dW): from dW kept since the forward when the layer's cost model allows it
  (`AdapterLayer.keeps_delta`: no more memory than the factored form, PEFT's, saves), else rebuilt;
* gradient accumulation: a kept dW lives in the layer's `DeltaCache` until the parameters change, so the
  micro-batches of one optimizer step build it once.

Under autocast dW does not join the frozen matmul (in bf16, W + dW would round a small update away):
the forward runs x W^T and x dW^T side by side, and the input gradient uses bf16(W + dW) -- it only feeds
earlier layers, where that rounding is the one autocast puts on every frozen weight.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

if TYPE_CHECKING:
    from .base import AdapterLayer


# ----------------------------------------------------------------------------- dW kept across calls
class DeltaCache:
    """One tensor built from the adapter (W + dW, or dW in the compute dtype), kept from forward to
    backward and across the micro-batches of one optimizer step, keyed by everything it was built from.

    A stale tensor is never used: the key holds (storage, `_version`, dtype, device) of every parameter
    and buffer of the layer (bases and base weight included), so in-place edits (`load_adapter`, `merge`,
    `copy_`) and replaced `.data` miss. Optimizers do not always bump `_version` (the fused AdamW kernel
    does not), so every `torch.optim` step clears all caches (global step hooks below); `train()`/`eval()`,
    `merge()` and `unmerge()` clear the layer's cache, and copies (deepcopy, pickling) start empty. The
    one write these cannot see is an in-place write through `.data` outside an optimizer: call `clear()`.
    """

    def __init__(self) -> None:
        # (key, tensor) in one attribute, read once: replicas that share the cache (DataParallel's
        # shallow copies, in threads) never pair one's key with another's tensor
        self.entry: tuple[tuple, torch.Tensor] | None = None

    def __iter__(self) -> Iterator[torch.Tensor]:
        """The kept tensor, if any (the bench counts it as saved memory)."""
        entry = self.entry
        if entry is not None:
            yield entry[1]

    def clear(self) -> None:
        self.entry = None

    def get(self, key: tuple, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The tensor for `key`, built (after freeing a stale one) only if the kept one was built from
        anything else."""
        entry = self.entry
        if entry is None or entry[0] != key:
            self.clear()
            entry = self.entry = (key, build())
            _LIVE.add(self)
        return entry[1]

    def __deepcopy__(self, memo: dict) -> DeltaCache:
        return DeltaCache()

    def __getstate__(self) -> dict[str, Any]:
        return {"entry": None}


_LIVE: weakref.WeakSet[DeltaCache] = weakref.WeakSet()


def clear_all_caches(*_: Any) -> None:
    """Drop every kept dW: called before and after each optimizer step (parameters change there)."""
    for cache in list(_LIVE):
        cache.clear()
    _LIVE.clear()


register_optimizer_step_pre_hook(clear_all_caches)
register_optimizer_step_post_hook(clear_all_caches)


def kept_delta(layer: AdapterLayer, kind: tuple, build: Callable[[], torch.Tensor], keep: bool
               ) -> torch.Tensor:
    """`build()`, once per state of the layer's tensors when `keep`, else every call (and nothing of
    an earlier call stays kept)."""
    if not keep or torch.is_inference_mode_enabled():
        layer.delta_cache.clear()
        return build()
    sources = (*layer.parameters(), *layer.buffers())
    key = (*kind, *((t.data_ptr(), t._version, t.dtype, t.device) for t in sources))
    return layer.delta_cache.get(key, build)


# ----------------------------------------------------------------------------- the autograd function
class _MergedLinear(torch.autograd.Function):
    """y = x (W + dW)^T + b (W None: y = x dW^T, next to the base matmul).

    With dW = P R, R frozen (`layer.delta_right()`, None: the identity), the forward saves u = x R^T --
    x itself by default -- and the kept weight of the input gradient if `layer.keeps_delta`; nothing
    weight-shaped otherwise. Backward: grad_x = g (W + dW); the gradient of P is g^T u (G when R is the
    identity); the parameters' gradients follow from it by the method's closed form, else by autograd
    through a rebuilt P. Backward re-enters the forward's autocast, so its matmuls see the same dtypes.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                layer: AdapterLayer, *params: torch.Tensor) -> torch.Tensor:
        half = autocast_dtype(x)
        keep, right = layer.keeps_delta(half), layer.delta_right()
        ctx.layer, ctx.x_shape, ctx.x_dtype, ctx.autocast = layer, x.shape, x.dtype, _autocast_state()
        ctx.identity_right = right is None
        x2 = x.reshape(-1, x.shape[-1])
        if half is not None:   # backward's g^T u runs in the autocast dtype anyway: keep u in it
            x2 = x2.to(half)
        u = x2 if right is None else x2 @ right.T.to(x2.dtype)
        out, grad_weight = _merged_forward(layer, x2, weight, bias, half, keep, ctx.needs_input_grad[0])
        x_for_w = x2 if ctx.needs_input_grad[1] and right is not None else None   # base unfrozen
        ctx.save_for_backward(u, weight, grad_weight, x_for_w)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        with contextlib.ExitStack() as stack:
            for device, dtype in ctx.autocast:
                stack.enter_context(torch.autocast(device, dtype=dtype))
            return _MergedLinear._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        u, weight, grad_weight, x2 = ctx.saved_tensors
        layer: AdapterLayer = ctx.layer
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g2 = grad_out.reshape(-1, grad_out.shape[-1]).to(u.dtype)
        grad_x = grad_w = grad_b = rebuilt = None
        if need_w:                                         # G (out x in): the gradient of W
            grad_w = (g2.T @ (u if ctx.identity_right else x2)).to(weight.dtype)
        param_grads = [None] * len(ctx.needs_input_grad[4:])
        if any(ctx.needs_input_grad[4:]):                  # g^T u: the gradient of P (G if R = identity)
            grad_left = grad_w if grad_w is not None and ctx.identity_right else g2.T @ u
            param_grads, rebuilt = _param_grads(layer, grad_left, ctx.needs_input_grad[4:])
        if need_x:
            if grad_weight is None:                        # not kept: rebuilt (reusing autograd's dW)
                grad_weight = _rebuild(layer, weight, rebuilt if ctx.identity_right else None)
            grad_x = (g2 @ grad_weight.to(g2.dtype)).to(ctx.x_dtype).view(ctx.x_shape)
        if need_b:
            grad_b = g2.sum(0).to(weight.dtype)
        return (grad_x, grad_w, grad_b, None, *param_grads)


def _merged_forward(layer: AdapterLayer, x2: torch.Tensor, weight: torch.Tensor | None,
                    bias: torch.Tensor | None, half: torch.dtype | None, keep: bool, need_x: bool
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(output, the weight of the input gradient if kept for backward) for 2-D x2 in the compute dtype.
    Joined (fp32): one matmul with W + dW, which is also what is kept. Otherwise dW in the compute dtype
    is what is kept (across micro-batches), beside the base matmul or alone."""
    if weight is not None and half is None:
        merged = kept_delta(layer, ("merged",), lambda: layer.merged_weight(weight), keep)
        return F.linear(x2, merged, bias), (merged if keep else None)
    dtype = half or x2.dtype
    delta = kept_delta(layer, ("delta", dtype), lambda: layer.delta_weight().to(dtype), keep)
    if weight is None:                                     # alone: x dW^T (adapter dropout)
        return F.linear(x2, delta), (delta if keep else None)
    out = F.linear(x2, weight.to(half), None if bias is None else bias.to(half)).addmm_(x2, delta.T)
    # bf16(W + dW) replaces the bf16 copy of W that autocast's own matmul would keep for backward
    return out, ((weight + delta).to(half) if need_x else None)


def _param_grads(layer: AdapterLayer, grad_left: torch.Tensor, needs: tuple[bool, ...]
                 ) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
    """The adapter parameters' gradients from the gradient of P, and the P that autograd rebuilt to get
    them (None with a closed form): the input gradient reuses it instead of building dW once more."""
    closed = layer.delta_param_grads(grad_left)
    if closed is not None:
        return [g if need else None for g, need in zip(closed, needs)], None
    params = [p for _, p in layer.adapter_parameters()]
    with torch.enable_grad():
        left, _ = layer.delta_split()
    grads = iter(torch.autograd.grad(left, [p for p, need in zip(params, needs) if need],
                                     grad_left.to(left.dtype)))
    return [next(grads) if need else None for need in needs], left.detach()


def _rebuild(layer: AdapterLayer, weight: torch.Tensor | None, delta: torch.Tensor | None) -> torch.Tensor:
    """The weight of the input gradient when it was not kept: W + dW (dW alone next to the base)."""
    if delta is None:
        if weight is not None:
            return layer.merged_weight(weight)
        delta = layer.delta_weight()
    return delta if weight is None else weight + delta


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
