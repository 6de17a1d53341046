"""The merged training path: x (W + dW)^T in one matmul, with dW built once per optimizer step.

A full-rank update (RandLoRA; LoHa at large r) is cheapest merged into the frozen matmul: its forward
costs one build of dW and its parameter gradient starts from the weight gradient G = g^T x that full
fine-tuning computes too. What it costs beyond that is decided here:

* the parameter gradient: a method with a closed form (`AdapterLayer.delta_param_grads`, RandLoRA's one
  projection B^T G) skips the autograd rebuild of dW's graph that every other method gets;
* the input gradient g (W + dW): from dW kept since the forward when the layer's cost model allows it
  (`AdapterLayer.keeps_delta`: no more memory than the factored form, PEFT's, saves). Where it is not
  kept, dW is still built once per call where the update has a frozen factor: with dW = L P (L frozen,
  RandLoRA's out >= in) backward uses g L for both gradients, g W + (g L) P and (g L)^T x; with dW = P Q
  (Q frozen, out < in) the forward applies u P^T to the u = x Q^T that backward keeps, and only backward
  builds dW (`factored_backward`, `factored_forward`: whichever costs fewer multiply-adds);
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

    Every cache joins the registry the step hooks clear when it is created, not when it is filled: a
    fill inside `torch.compile`d code registers through a `set.add` there, and dynamo (torch 2.13.0)
    loses every `add` of a new object into a non-empty global set -- it guards on the set's contents,
    and the code it recompiles for a set holding `a` leaves it holding `a` alone. Minimal reproducer:

        LIVE = set()
        f = torch.compile(lambda box, x: (LIVE.add(box), x + 1)[1])
        a, b = object(), object(); f(a, torch.ones(1)); f(b, torch.ones(1))
        assert b in LIVE   # fails: LIVE == {a}

    Registered on fill, a compiled RandLoRA model had every kept W + dW but the first layer's missed
    by the optimizer step's clearing (and the fused AdamW kernel keeps `_version`, so its key still
    matched): later steps reused the first compiled step's weights and drifted from eager
    (tests/runners/test_compile.py `test_compiled_layers_train_as_eager`). Compiled code now keeps
    nothing across calls either (`kept_delta`).
    """

    def __init__(self) -> None:
        # (key, tensor) in one attribute, read once: replicas that share the cache (DataParallel's
        # shallow copies, in threads) never pair one's key with another's tensor
        self.entry: tuple[tuple, torch.Tensor] | None = None
        _LIVE.add(self)

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
        return entry[1]

    def __deepcopy__(self, memo: dict) -> DeltaCache:
        return DeltaCache()

    def __getstate__(self) -> dict[str, Any]:
        return {"entry": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.entry = None   # an unpickled cache starts empty and registered, like a new one
        _LIVE.add(self)


_LIVE: weakref.WeakSet[DeltaCache] = weakref.WeakSet()


def clear_all_caches(*_: Any) -> None:
    """Drop every kept dW: called before and after each optimizer step (parameters change there)."""
    for cache in list(_LIVE):
        cache.clear()


register_optimizer_step_pre_hook(clear_all_caches)
register_optimizer_step_post_hook(clear_all_caches)


def kept_delta(layer: AdapterLayer, kind: tuple, build: Callable[[], torch.Tensor], keep: bool
               ) -> torch.Tensor:
    """`build()`, once per state of the layer's tensors when `keep`, else every call (and nothing of
    an earlier call stays kept). Compiled code builds every call and keeps nothing across calls: dynamo
    cannot trace `torch.is_inference_mode_enabled` or the key's `data_ptr`, and each graph break in a
    layer's forward made a frame that dynamo recompiled per layer shape (the forward still saves what it
    built for its own backward)."""
    if torch.compiler.is_compiling():
        return build()
    if not keep or torch.is_inference_mode_enabled():
        layer.delta_cache.clear()
        return build()
    sources = (*layer.parameters(), *layer.buffers())
    key = (*kind, *((t.data_ptr(), t._version, t.dtype, t.device) for t in sources))
    return layer.delta_cache.get(key, build)


# ----------------------------------------------------------------------------- the autograd function
class _MergedLinear(torch.autograd.Function):
    """y = x (W + dW)^T + b (W None: y = x dW^T, next to the base matmul).

    With dW = L P Q, L and Q frozen (`layer.delta_left()`, `layer.delta_right()`; None: the identity),
    the forward saves u = x Q^T -- x itself by default -- and the kept weight of the input gradient if
    `layer.keeps_delta`; nothing weight-shaped otherwise. Backward: grad_x = g (W + dW); the gradient of
    P is L^T g^T u (G when L and Q are the identity); the parameters' gradients follow from it by the
    method's closed form, else by autograd through a rebuilt P. Where dW is not kept, one of the two
    passes runs factored (`factored_forward`, `factored_backward`), so a call builds dW once. Backward
    re-enters the forward's autocast, so its matmuls see the same dtypes.
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
        u = x2 if right is None else mm(x2, right.T.to(x2.dtype))
        if weight is not None and half is None and not keep and right is not None and factored_forward(x2):
            # dW is not kept, so backward builds it anyway: here x dW^T = u P^T, with no build
            out, grad_weight = F.linear(x2, weight, bias).addmm_(u, layer.delta_split()[0].T), None
        else:
            out, grad_weight = _merged_forward(layer, x2, weight, bias, half, keep, ctx.needs_input_grad[0])
        x_for_w = x2 if ctx.needs_input_grad[1] and right is not None else None   # base unfrozen
        # a view of the input is saved as the input itself (backward flattens it): torch.compile refuses
        # to save a view of an input made inside the function
        u_saved = x if right is None and half is None else u
        ctx.save_for_backward(u_saved, weight, grad_weight,
                              x if x_for_w is not None and half is None else x_for_w)
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
        saved_u, weight, kept, saved_x = ctx.saved_tensors
        u, x2 = _flat(saved_u), _flat(saved_x)
        assert u is not None   # forward always saves u: x, or x Q^T
        layer: AdapterLayer = ctx.layer
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        needs_p = ctx.needs_input_grad[4:]
        g2 = grad_out.reshape(-1, grad_out.shape[-1]).to(u.dtype)
        grad_x = grad_w = grad_b = rebuilt = None
        if need_w:                                         # G (out x in): the gradient of W
            x_w = u if ctx.identity_right else x2
            assert x_w is not None   # forward saves x when W needs a gradient and Q is not the identity
            grad_w = (g2.T @ x_w).to(weight.dtype)
        left = layer.delta_left()                          # dW = L P Q with L frozen (None: identity)
        left = None if left is None else left.to(g2.dtype)
        # dW not kept: g L serves both gradients, so dW is not built a second time (where that is cheaper)
        gl = mm(g2, left) if (need_x and kept is None and left is not None and ctx.identity_right
                              and factored_backward(g2.shape[0], left.shape[0], left.shape[1],
                                                    u.shape[1])) else None
        param_grads: list[torch.Tensor | None] = [None] * len(needs_p)
        if any(needs_p):
            grad_p = _grad_of_p(g2, u, left, gl, grad_w if ctx.identity_right else None)
            param_grads, rebuilt = _param_grads(layer, grad_p, needs_p)
        if need_x:
            reuse = rebuilt if ctx.identity_right and left is None else None   # autograd's P is dW
            grad_x = _input_grad(layer, g2, weight, kept, gl, reuse).to(ctx.x_dtype).view(ctx.x_shape)
        if need_b:
            grad_b = g2.sum(0).to(weight.dtype)
        return (grad_x, grad_w, grad_b, None, *param_grads)


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    """A saved input as the 2-D (tokens x features) matrix backward multiplies (no operator if it is one)."""
    return t if t is None or t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _grad_of_p(g2: torch.Tensor, u: torch.Tensor, left: torch.Tensor | None, gl: torch.Tensor | None,
               grad_w: torch.Tensor | None) -> torch.Tensor:
    """The gradient of P in dW = L P Q: L^T g^T u, as (g L)^T u where backward has g L, else from
    g^T u -- the base weight's gradient G when it was computed (Q the identity)."""
    if gl is not None:
        return mm(gl.T, u)
    grad = grad_w if grad_w is not None else mm(g2.T, u)
    return grad if left is None else mm(left.T, grad.to(left.dtype))


def _input_grad(layer: AdapterLayer, g2: torch.Tensor, weight: torch.Tensor | None, kept: torch.Tensor | None,
                gl: torch.Tensor | None, rebuilt: torch.Tensor | None) -> torch.Tensor:
    """g (W + dW) (W None: g dW): g W + (g L) P where backward has g L, else from the W + dW kept since
    the forward, else from a rebuilt one (reusing autograd's dW if `_param_grads` built it)."""
    if gl is not None:
        p = layer.delta_split()[0].to(g2.dtype)
        return gl @ p if weight is None else (g2 @ weight.to(g2.dtype)).addmm_(gl, p)
    if kept is None:
        kept = _rebuild(layer, weight, rebuilt)
    return g2 @ kept.to(g2.dtype)


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


def factored_forward(x2: torch.Tensor) -> bool:
    """With a frozen right factor (dW = P Q) and dW not kept: x dW^T = u P^T from the u = x Q^T that
    backward needs anyway (tokens * out * k) beats building dW (out * k * in) when tokens < in."""
    return x2.shape[0] < x2.shape[1]


def factored_backward(tokens: int, out: int, k: int, inp: int) -> bool:
    """With a frozen left factor (dW = L P, L: out x k) and dW not kept: g L, shared by the gradient of P
    ((g L)^T x) and the input gradient (g W + (g L) P), beats G = g^T x, L^T G and rebuilding dW."""
    return tokens * k * (out + 2 * inp) < tokens * out * inp + 2 * k * out * inp


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b; computed as (b^T a^T)^T, a column-major result, when b's column count is not a multiple of
    16 but a's row count is: MKL on the 2-core AVX2 dev machine ran x (1024 x 1536) @ B (1536 x 391) at
    37 GMAC/s and the transposed product at 43 (with 384 columns: 45 either way). RandLoRA's n r is
    rarely a round number."""
    if b.shape[1] % 16 and not a.shape[0] % 16:
        return (b.T @ a.T).T
    return a @ b


def _param_grads(layer: AdapterLayer, grad_left: torch.Tensor, needs: tuple[bool, ...]
                 ) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
    """The adapter parameters' gradients from the gradient of P, and the P that autograd rebuilt to get
    them (None with a closed form): the input gradient reuses it instead of building dW once more."""
    closed = layer.delta_param_grads(grad_left)
    if closed is not None:
        return [g if need else None for g, need in zip(closed, needs, strict=True)], None
    params = [p for _, p in layer.adapter_parameters()]
    with torch.enable_grad():
        left, _ = layer.delta_split()
    grads = iter(torch.autograd.grad(left, [p for p, need in zip(params, needs, strict=True) if need],
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
    if device == "meta":  # no autocast there (runners/engine/memplan.py traces on meta and emulates it)
        return None
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _autocast_state() -> list[tuple[str, torch.dtype]]:
    """(device type, dtype) of every autocast region active now. Autograd runs a custom backward with
    autocast off, so a backward that mixes saved half-precision tensors with fp32 weights re-enters these."""
    return [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
