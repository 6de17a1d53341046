"""LoHa: dW = (alpha / r) * (W1a @ W1b) * (W2a @ W2b), a Hadamard product of two rank-r products.

Follows PEFT's LoHaConfig (its `hada_*` tensors are our `loha_*`). rank(dW) <= r^2 for 2x LoRA's params.
`dropout` is dropout on the adapter input, the same for every method here; PEFT's LoHa instead offers
rank_dropout / module_dropout (not implemented: the benchmark regularises all methods the same way).
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .base import AdapterLayer, Validator, autocast_dtype, common_hp, register
from .peft_spec import NO_EXTRA_MODULES, PeftSpec, number


@register("loha")
class LoHa(AdapterLayer):
    """W1a, W1b, W2a kaiming-uniform and W2b zero, so dW == 0 at init."""

    label: ClassVar[str] = "LoHa"

    # Our `dropout` drops the adapter's input, PEFT's rank_/module_dropout differ; both act in training
    # only, so eval outputs are equal and the export writes PEFT's 0.0.
    peft: ClassVar[PeftSpec] = PeftSpec(
        "LOHA", "LoHaConfig",
        {"loha_w1a": "hada_w1_a", "loha_w1b": "hada_w1_b", "loha_w2a": "hada_w2_a", "loha_w2b": "hada_w2_b"},
        lambda hp: {"r": hp["r"], "alpha": number(hp["alpha"]), "rank_dropout": 0.0, "module_dropout": 0.0,
                    "use_effective_conv2d": False, "init_weights": True, "rank_pattern": {},
                    "alpha_pattern": {}},
        lambda c: {"r": c["r"], "alpha": c["alpha"]},
        NO_EXTRA_MODULES,
        patterns=True)  # peft 0.21.2 peft/tuners/lycoris_utils.py LycorisConfig.rank_pattern/alpha_pattern

    hp_spec: ClassVar[dict[str, tuple[Any, Validator]]] = common_hp(alpha=8.0)

    @classmethod
    def num_params(cls, in_features: int, out_features: int, **hp: Any) -> int:
        return 2 * hp["r"] * (in_features + out_features)

    @classmethod
    def max_rank(cls, in_features: int, out_features: int, **hp: Any) -> int:
        return min(hp["r"] ** 2, in_features, out_features)

    def init_adapter(self, factory: dict[str, Any], shared: nn.Module | None) -> None:
        r, n_in, n_out = self.hp["r"], self.in_features, self.out_features
        # the out-side factors are (out x r) as in PEFT, stored column-major so that the Khatri-Rao
        # product P is built as a contiguous (r^2 x out) tensor (see AdapterLayer.adapter_factors)
        self.loha_w1a = nn.Parameter(torch.empty(r, n_out, **factory).T)
        self.loha_w1b = nn.Parameter(torch.empty(r, n_in, **factory))
        self.loha_w2a = nn.Parameter(torch.empty(r, n_out, **factory).T)
        self.loha_w2b = nn.Parameter(torch.empty(r, n_in, **factory))

    @torch.no_grad()
    def reset_adapter(self) -> None:
        for p in (self.loha_w1a, self.loha_w1b, self.loha_w2a):
            # drawn in row-major order whatever the storage layout: a seed gives the same weights
            p.copy_(nn.init.kaiming_uniform_(torch.empty_like(p, memory_format=torch.contiguous_format),
                                             a=math.sqrt(5)))
        nn.init.zeros_(self.loha_w2b)

    def delta_weight(self) -> torch.Tensor:
        return (self.loha_w1a @ self.loha_w1b) * (self.loha_w2a @ self.loha_w2b) * self.scaling

    def khatri_rao(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(P (out x r^2), Q (r^2 x in)) with P @ Q == (W1a W1b) * (W2a W2b), unscaled.

        dW[o, i] = sum_{k,l} W1a[o,k] W2a[o,l] W1b[k,i] W2b[l,i]: P is the row-wise Khatri-Rao
        (face-splitting) product of W1a and W2a, Q the column-wise one of W1b and W2b.
        """
        r = self.hp["r"]
        # P is returned as a view of the contiguous (r^2 x out) product: P^T is contiguous
        p = (self.loha_w1a.T[:, None, :] * self.loha_w2a.T[None, :, :]).reshape(r * r, self.out_features).T
        q = (self.loha_w1b[:, None, :] * self.loha_w2b[None, :, :]).reshape(r * r, self.in_features)
        return p, q

    def adapter_factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Rank-r^2 factored form: r^2 (in + out) per token, dW never formed. The base class takes the
        # merged path instead when that is cheaper (large r, few tokens): see `use_merged_path`.
        p, q = self.khatri_rao()
        return F.linear(x, q) * self.scaling, p

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        # fp32 training path: base and rank-r^2 update in one function (`_HadaLinear`); under autocast the
        # generic factored path runs (autocast casts its matmuls itself)
        if autocast_dtype(x) is not None:
            return None
        base = self.base_layer
        return _HadaLinear.apply(x, base.weight, base.bias, self.scaling, self.loha_w1a, self.loha_w1b,
                                 self.loha_w2a, self.loha_w2b)

    def factored_macs(self, tokens: int) -> int:
        r2, n = self.hp["r"] ** 2, self.in_features + self.out_features
        return (tokens + 1) * r2 * n

    def delta_macs(self) -> int:
        return self.out_features * self.in_features * (2 * self.hp["r"] + 2)


def _khatri_rao_grads(grad: torch.Tensor, left: torch.Tensor, right: torch.Tensor
                      ) -> tuple[torch.Tensor, ...]:
    """Gradients of `left` and `right` (r x n each) from the gradient of their Khatri-Rao product
    (r^2 x n, row k r + l = left[k] * right[l])."""
    g = grad.view(left.shape[0], right.shape[0], -1)
    return (g * right[None]).sum(1), (g * left[:, None]).sum(0)


class _HadaLinear(torch.autograd.Function):
    """y = x W^T + b + s (x Q^T) P^T: LoHa's factored form (P, Q the Khatri-Rao products, see
    `LoHa.khatri_rao`) with the base matmul, in one function.

    Through autograd, the factored form also scales the (T x r^2) intermediate each way and sums two input
    gradients; here the scale rides in the GEMMs (`alpha`) and the update accumulates into the base output
    and the input gradient in place: per layer and training step 18 kernels with the base's (5 forward)
    instead of 21, 49 dispatched operators instead of 58 (runners.engine.measure.StepCounts), which a GPU
    launches one by one. Saved for backward: x and the (T x r^2) intermediate h, as autograd saves, and
    the two small products (r^2 x (in + out)).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float,
                w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor) -> torch.Tensor:
        r = w1b.shape[0]
        p_t = (w1a.T[:, None, :] * w2a.T[None, :, :]).view(r * r, -1)   # P^T (r^2 x out)
        q = (w1b[:, None, :] * w2b[None, :, :]).view(r * r, -1)          # Q (r^2 x in)
        x2 = x.reshape(-1, x.shape[-1])
        h = x2 @ q.T
        out = F.linear(x2, weight, bias).addmm_(h, p_t, alpha=scale)
        ctx.scale = scale
        ctx.save_for_backward(x, h, p_t, q, weight, w1a, w1b, w2a, w2b)   # x itself: torch.compile refuses
        return out.view(*x.shape[:-1], out.shape[-1])                     # a saved view of an input

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, h, p_t, q, weight, w1a, w1b, w2a, w2b = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g2, s = grad_out.reshape(-1, grad_out.shape[-1]), ctx.scale
        gh = torch.addmm(h, g2, p_t.T, beta=0, alpha=s)            # s g P, (T x r^2); h only lends its shape
        grad_pt = torch.addmm(p_t, h.T, g2, beta=0, alpha=s)       # s h^T g, (r^2 x out)
        grad_q = gh.T @ x2                                          # (r^2 x in)
        grad_x = (g2 @ weight).addmm_(gh, q).view(x.shape) if need_x else None
        grad_w = g2.T @ x2 if need_w else None
        grad_b = g2.sum(0) if need_b else None
        g1a, g2a = _khatri_rao_grads(grad_pt, w1a.T, w2a.T)
        g1b, g2b = _khatri_rao_grads(grad_q, w1b, w2b)
        return grad_x, grad_w, grad_b, None, g1a.T, g1b, g2a.T, g2b
