"""Which path a call takes: the factored form or the merged path, by counting multiply-adds.

An adapter's update can meet the frozen matmul in two ways. The factored path applies the method's own
small factors to x (LoRA: x A^T B^T) and never builds dW. The merged path (methods/fastpath.py) builds dW
and lets one matmul do the rest; for a full-rank update (RandLoRA, LoHa at large r) that is far cheaper.
`CostModel` is the mixin of `AdapterLayer` (methods/base.py) that holds

* the hooks a method may define to make the merged path cheap (`delta_split`, `delta_right`,
  `merged_weight`, `delta_param_grads`, `delta_keep_allowance`); the defaults are correct for any method;
* the cost model: multiply-adds of each path for one call (`path_macs`), whether dW is kept between calls
  (`keeps_delta`), and the choice (`use_merged_path`);
* `routed_forward`, the part of `AdapterLayer.forward` that applies that choice.

A new method needs none of it to be correct: it only changes how fast the method runs.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from .fastpath import autocast_dtype, merged_linear

if TYPE_CHECKING:
    from .base import AdapterLayer


class CostModel:
    """Path choice and merged-path hooks of `AdapterLayer` (see the module docstring)."""

    if TYPE_CHECKING:   # provided by `AdapterLayer` (methods/base.py), the one class that mixes this in
        training: bool
        base_layer: nn.Linear
        adapter_dropout: nn.Module
        adapter_dtype: torch.dtype

        @property
        def in_features(self) -> int: ...
        @property
        def out_features(self) -> int: ...
        def delta_weight(self) -> torch.Tensor: ...
        def adapter_forward(self, x: torch.Tensor) -> torch.Tensor: ...
        def adapter_factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None: ...
        def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None: ...
        def adapter_parameters(self) -> list[tuple[str, nn.Parameter]]: ...

    # -- the merged path (methods/fastpath.py): what a method may define --------------------------------
    def delta_split(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(P, Q) with dW = L P Q, L (`delta_left`) and Q frozen, computed with autograd's graph by the
        merged path's backward when the method has no closed-form `delta_param_grads`; default (dW, None)."""
        return self.delta_weight(), self.delta_right()

    def delta_right(self) -> torch.Tensor | None:
        """Q of `delta_split` alone (cheap, no dW built): the merged path saves x Q^T for backward instead
        of x. None: the identity."""
        return None

    def delta_left(self) -> torch.Tensor | None:
        """L with dW = L P, L frozen and P cheap to build (RandLoRA with out >= in: its bases B), or None.
        Where dW is not kept, the merged path then computes the input gradient as g W + (g L) P and the
        gradient of P from the same g L, instead of building dW a second time (see `merged_backward_macs`)."""
        return None

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W + dW, in one operation where the method has one (RandLoRA: one addmm)."""
        return weight + self.delta_weight()

    def delta_param_grads(self, grad_left: torch.Tensor) -> list[torch.Tensor] | None:
        """Gradients of all `adapter_parameters()` from the gradient of P (`delta_split`), without
        rebuilding dW; None (the default): autograd through a rebuilt P."""
        return None

    def delta_keep_allowance(self, half: torch.dtype | None) -> int:
        """Elements (of the dtype a kept dW has: `half` under autocast, else the adapter's) that the
        factored form saves for backward beyond what the merged path saves: the memory within which
        keeping dW costs no more than PEFT. 0 (the default): never keep."""
        return 0

    def keeps_delta(self, half: torch.dtype | None = None) -> bool:
        """Keep dW (W + dW when joined) from forward to backward, and across the micro-batches of one
        optimizer step, instead of rebuilding it: in training, wherever its out x in elements fit in
        `delta_keep_allowance`, so that saved memory stays at or below the factored form's (PEFT's)."""
        return self.training and self.out_features * self.in_features <= self.delta_keep_allowance(half)

    # -- cost model (multiply-adds), used to pick the cheaper of the factored and the merged path --------
    def factored_macs(self, tokens: int) -> int | None:
        """Multiply-adds of one `adapter_forward` over `tokens` rows; None if it has no factored form."""
        return None

    def delta_macs(self) -> int:
        """Multiply-adds of one `delta_weight()` (building dW)."""
        return self.out_features * self.in_features

    def merged_backward_macs(self, tokens: int, keep: bool) -> int:
        """Multiply-adds of the merged path's backward beyond the input gradient: by default the weight
        gradient G = g^T x, rebuilding dW with autograd's graph (D) and backpropagating G into the
        factors (~2D), whose dW the input gradient reuses."""
        return tokens * self.out_features * self.in_features + 3 * self.delta_macs()

    def merged_forward_macs(self, tokens: int, backward_builds: bool) -> int:
        """Multiply-adds the merged path's forward adds to the frozen matmul: one build of dW (D). When
        backward builds dW anyway (training, dW not kept, joined fp32 call), a method with a frozen right
        factor (`delta_right`) may apply the update factored instead (methods/fastpath.py
        `factored_forward`)."""
        return self.delta_macs()

    def path_macs(self, tokens: int, grad: bool, joins_base: bool = True, shares_input: bool = True,
                  half: torch.dtype | None = None) -> tuple[float, int]:
        """Multiply-adds the adapter adds to one call over `tokens` rows: (factored path, merged path).

        Factored: the adapter's own forward F per call, ~3F with its backward (input and parameter grads);
        infinite for a method without one. Merged: the base matmul absorbs dW, so a forward costs only
        building dW (D); training adds `merged_backward_macs` (which counts a rebuild of dW unless
        `keeps_delta`). When dW cannot join the base matmul, x dW^T is one more tokens * out * in, and
        its input gradient another unless the adapter shares the base's input (autocast: the input
        gradient uses W + dW; adapter dropout: it cannot).
        """
        forward = self.factored_macs(tokens)
        factored = math.inf if forward is None else forward * (3 if grad else 1)
        dense = tokens * self.out_features * self.in_features
        keep = self.keeps_delta(half)
        merged = self.merged_forward_macs(tokens, backward_builds=grad and joins_base and not keep)
        merged += self.merged_backward_macs(tokens, keep) if grad else 0
        if not joins_base:
            merged += 2 * dense if grad and not shares_input else dense
        return factored, merged

    def route(self, x: torch.Tensor) -> dict[str, Any]:
        """How the update meets the base layer for input x: the keywords of `path_macs`."""
        half = autocast_dtype(x)
        shares = self.shares_input(x)
        return {"joins_base": shares and half is None, "shares_input": shares, "half": half}

    def use_merged_path(self, tokens: int, grad: bool, joins_base: bool = True, shares_input: bool = True,
                        half: torch.dtype | None = None) -> bool:
        """Whether materialising dW beats the factored form for this call (see `path_macs`)."""
        factored, merged = self.path_macs(tokens, grad, joins_base, shares_input, half)
        return merged < factored

    def shares_input(self, x: torch.Tensor) -> bool:
        """The adapter sees the base layer's own input: no active dropout, and one dtype throughout or
        autocast (which runs both in its dtype). Required by `fused_forward`."""
        no_dropout = isinstance(self.adapter_dropout, nn.Identity) or not self.training
        same_dtype = x.dtype == self.base_layer.weight.dtype == self.adapter_dtype
        return no_dropout and (same_dtype or autocast_dtype(x) is not None)

    def joins_base(self, x: torch.Tensor) -> bool:
        """dW can join the base matmul: the same input, and no autocast (in bf16, W + dW would round a
        small update away)."""
        return self.shares_input(x) and autocast_dtype(x) is None

    # -- the choice, applied ----------------------------------------------------------------------------
    def routed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """`layer(x)` of an unmerged layer, through the path `use_merged_path` picks for this call."""
        tokens = x.numel() // max(1, x.shape[-1])
        grad = torch.is_grad_enabled() and any(p.requires_grad for _, p in self.adapter_parameters())
        route = self.route(x)
        half, shares = route["half"], route["shares_input"]
        if self.use_merged_path(tokens, grad, **route):
            if shares:   # fp32: dW rides in the base matmul; autocast: beside it (see methods/fastpath.py)
                return merged_linear(cast("AdapterLayer", self), x)
            out = self.base_layer(x)                       # adapter dropout: x' dW^T on its own
            xa = self.adapter_dropout(x.to(self.adapter_dtype))
            return out + merged_linear(cast("AdapterLayer", self), xa, alone=True).to(out.dtype)
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
