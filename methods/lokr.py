"""LoKr: dW = (alpha / r) * kron(W1, W2) (PEFT LoKrConfig semantics).

out = a * b and in = c * d come from `factorization(dim, factor)`; W1 is (a x c), W2 is (b x d).
W2 is full unless r < max(b, d) / 2, then rank r (W2a @ W2b); W1 is full unless `decompose_both` and
r < max(a, c) / 2. With factor -1 (most balanced split) LoKr is tiny: its parameter count saturates
once both factors are full, so large budgets need a small `factor`.
`dropout` is dropout on the adapter input (as for every method here), not PEFT's rank/module dropout.
"""
from __future__ import annotations

import functools
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .base import AdapterLayer, Validator, autocast_dtype, boolean, common_hp, integer, register
from .peft_spec import NO_EXTRA_MODULES, PeftSpec, number, same

#: factors the budget solver tries besides -1; 1 is excluded because kron(1x1, W2) is plain LoRA.
SOLVER_FACTORS = (-1, *range(2, 65))


def lokr_factor(key: str, value: Any) -> int:
    value = integer(key, value)
    if value != -1 and value <= 0:
        raise ValueError(f"{key} must be -1 (most balanced split) or a positive integer, got {value!r}")
    return value


@functools.lru_cache(maxsize=4096)
def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split `dimension` into m * n as PEFT does.

    A positive factor that divides the dimension is used as is: (factor, dimension // factor), not
    reordered. Otherwise walk the divisors upwards while they stay <= factor (any for -1) and the pair
    is still unbalanced, and return the last pair with the smaller number first.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        nxt = next(d for d in range(m + 1, dimension + 1) if dimension % d == 0)
        if nxt > limit:
            break
        m, n = nxt, dimension // nxt
    return min(m, n), max(m, n)


def kron_shapes(in_features: int, out_features: int, hp: dict[str, Any]
                ) -> tuple[int, int, int, int, bool, bool]:
    """(a, b, c, d, w1_full, w2_full): W1 is (a x c), W2 is (b x d); the full/low-rank rule of PEFT."""
    a, b = factorization(out_features, hp["factor"])
    c, d = factorization(in_features, hp["factor"])
    r = hp["r"]
    w1_full = not (hp["decompose_both"] and r < max(a, c) / 2)
    w2_full = not (r < max(b, d) / 2)
    return a, b, c, d, w1_full, w2_full


@register("lokr")
class LoKr(AdapterLayer):
    """W1 (or W1a) zero, everything else kaiming-uniform, so dW == 0 at init."""

    label: ClassVar[str] = "LoKr"

    # dropout: as for LoHa (PEFT's rank_/module_dropout act in training only; the export writes 0.0)
    peft: ClassVar[PeftSpec] = PeftSpec(
        "LOKR", "LoKrConfig",
        same(("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")),
        lambda hp: {"r": hp["r"], "alpha": number(hp["alpha"]), "decompose_factor": hp["factor"],
                    "decompose_both": hp["decompose_both"], "rank_dropout": 0.0, "module_dropout": 0.0,
                    "rank_dropout_scale": False, "use_effective_conv2d": False, "init_weights": True,
                    "rank_pattern": {}, "alpha_pattern": {}},
        lambda c: {"r": c["r"], "alpha": c["alpha"], "factor": c["decompose_factor"],
                   "decompose_both": c["decompose_both"]},
        NO_EXTRA_MODULES,
        patterns=True)  # peft 0.21.2 peft/tuners/lycoris_utils.py LycorisConfig.rank_pattern/alpha_pattern

    hp_spec: ClassVar[dict[str, tuple[Any, Validator]]] = {
        **common_hp(alpha=8.0), "factor": (-1, lokr_factor), "decompose_both": (False, boolean)}
    budget_knobs: ClassVar[tuple[str, ...]] = ("factor", "r")

    @classmethod
    def num_params(cls, in_features: int, out_features: int, **hp: Any) -> int:
        a, b, c, d, w1_full, w2_full = kron_shapes(in_features, out_features, hp)
        r = hp["r"]
        return (a * c if w1_full else r * (a + c)) + (b * d if w2_full else r * (b + d))

    @classmethod
    def max_rank(cls, in_features: int, out_features: int, **hp: Any) -> int:
        a, b, c, d, w1_full, w2_full = kron_shapes(in_features, out_features, hp)
        r = hp["r"]
        rank1 = min(a, c) if w1_full else min(r, a, c)
        rank2 = min(b, d) if w2_full else min(r, b, d)
        return rank1 * rank2

    @classmethod
    def budget_candidates(cls, shapes: list[tuple[int, int]], fixed: dict[str, Any]) -> list[dict]:
        out: list[dict[str, int]] = []
        for f in SOLVER_FACTORS:
            # beyond half the largest factor dimension every weight is full and r no longer changes counts
            top = max(max(*factorization(i, f), *factorization(o, f)) for i, o in shapes)
            out.extend({"factor": f, "r": r} for r in range(1, top // 2 + 2))
        return out

    def init_adapter(self, factory: dict[str, Any], shared: nn.Module | None) -> None:
        a, b, c, d, w1_full, w2_full = kron_shapes(self.in_features, self.out_features, self.hp)
        self.kron_dims = (a, b, c, d)
        r = self.hp["r"]
        if w1_full:
            self.lokr_w1 = nn.Parameter(torch.empty(a, c, **factory))
        else:
            self.lokr_w1_a = nn.Parameter(torch.empty(a, r, **factory))
            self.lokr_w1_b = nn.Parameter(torch.empty(r, c, **factory))
        if w2_full:
            self.lokr_w2 = nn.Parameter(torch.empty(b, d, **factory))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, r, **factory))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, d, **factory))

    def reset_adapter(self) -> None:
        if hasattr(self, "lokr_w1"):
            nn.init.zeros_(self.lokr_w1)
        else:
            nn.init.zeros_(self.lokr_w1_a)
            nn.init.kaiming_uniform_(self.lokr_w1_b, a=math.sqrt(5))
        for name in ("lokr_w2", "lokr_w2_a", "lokr_w2_b"):
            if hasattr(self, name):
                nn.init.kaiming_uniform_(getattr(self, name), a=math.sqrt(5))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The two Kronecker factors W1 (a x c) and W2 (b x d), unscaled."""
        right, left = self.w2_factors()
        return self.w1(), right if left is None else left @ right

    def w1(self) -> torch.Tensor:
        """W1 (a x c), unscaled; built from its two factors under `decompose_both`."""
        return self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b

    def w2_factors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(R, L) with W2 = L R: (W2b, W2a) when W2 is low rank, (W2, None) when it is full."""
        if hasattr(self, "lokr_w2"):
            return self.lokr_w2, None
        return self.lokr_w2_b, self.lokr_w2_a

    def delta_weight(self) -> torch.Tensor:
        w1, w2 = self.factors()
        return torch.kron(w1, w2) * self.scaling

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        # The vec trick: kron(W1, W2) vec(X) == vec(W1 X W2^T) with X = x viewed as (c x d), row-major.
        # A low-rank W2 (= W2a W2b) is applied as its two factors, never formed; the contraction order
        # (c first or d first) is the cheaper one for these shapes (see `_order_macs`).
        a, b, c, d = self.kron_dims
        lead, tokens = x.shape[:-1], x.numel() // max(1, x.shape[-1])
        w1 = self.w1() * self.scaling
        right, left = self.w2_factors()
        w2s = (right,) if left is None else (right, left)
        y = x.reshape(tokens, c, d)
        right_first, _ = self._order_macs(tokens)
        if right_first:
            y = _right(y, w2s[0])
            y = _left(y, w1)
            for w in w2s[1:]:
                y = _right(y, w)
        else:
            y = _left(y, w1)
            for w in w2s:
                y = _right(y, w)
        return y.reshape(*lead, a * b)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        # Training path when d is contracted first: `_KronLinear` keeps only the thin (c, T, k)
        # intermediate for backward and accumulates the update into the base output in place.
        if not self._order_macs(1)[0]:
            return None
        base = self.base_layer
        return _KronLinear.apply(x, base.weight, base.bias, self.w1() * self.scaling, *self.w2_factors())

    def _order_macs(self, tokens: int) -> tuple[bool, int]:
        """(contract d before c?, multiply-adds of the factored forward over `tokens` rows)."""
        a, b, c, d = self.kron_dims
        low_rank = not hasattr(self, "lokr_w2")
        k = self.hp["r"] if low_rank else b               # width after the first W2 factor
        tail = a * k * b if low_rank else 0                # W2a on the a rows
        w1_build = 0 if hasattr(self, "lokr_w1") else a * c * self.hp["r"]
        right = c * d * k + a * c * k + tail               # d -> k on c rows, then W1 over c
        left = a * c * d + a * d * k + tail                # W1 over c first, then d -> k on a rows
        return right <= left, tokens * min(right, left) + w1_build

    def factored_macs(self, tokens: int) -> int:
        return self._order_macs(tokens)[1]

    def delta_macs(self) -> int:
        a, b, c, d = self.kron_dims
        r = self.hp["r"]
        w1 = 0 if hasattr(self, "lokr_w1") else a * c * r
        w2 = 0 if hasattr(self, "lokr_w2") else b * d * r
        return self.out_features * self.in_features + w1 + w2


def _right(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(T, m, k) -> (T, m, j): y @ w^T over the last axis, as one 2-D GEMM."""
    t, m, k = y.shape
    return F.linear(y.reshape(t * m, k), w).view(t, m, w.shape[0])


def _left(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(T, m, k) -> (T, j, k): w @ y over the middle axis, as one 2-D GEMM on the transposed view."""
    t, m, k = y.shape
    z = F.linear(y.transpose(1, 2).reshape(t * k, m), w)         # (T k, j)
    return z.view(t, k, w.shape[0]).transpose(1, 2).contiguous()


def _swap(m: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(rows * cols, k) with rows (p, q) -> contiguous (cols, rows, k): the axis swap that lets every
    product of the Kronecker path be one 2-D GEMM (a copy of this small intermediate, never of x or y)."""
    return m.view(rows, cols, -1).transpose(0, 1).contiguous()


class _KronLinear(torch.autograd.Function):
    """y = x W^T + b + x kron(w1, L R)^T with the d axis contracted first, in one function.

    x is viewed as (T, c, d). Forward: z1[j] = x[:, j, :] R^T  (c, T, k), z2 = w1 z1  (a, T, k), and
    y[:, i, :] += z2[i] L^T (L = None: W2 is full and R is W2, so y[:, i, :] += z2[i]). Every product is
    one 2-D GEMM over all tokens, the last accumulating into the base output in place: no Python loop over
    c or a (c + a small GEMMs per layer and step, 128 at 4096 wide, would leave a GPU launch-bound), no
    (T x out) adapter output, and only the thin intermediates (T c k, T a k numbers) are transposed by
    copy (`_swap`), never x or y. Saved for
    backward: x (which the adapter's gradient needs in any form), the weights and z1 (T c k numbers;
    PEFT keeps the out x in dW instead); z2 = w1 z1 is recomputed (a c T k multiply-adds).
    w1 arrives scaled and already built (W1 or W1a W1b), so autograd handles those small steps.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, w1: torch.Tensor,
                right: torch.Tensor, left: torch.Tensor | None) -> torch.Tensor:
        half = autocast_dtype(x)
        if half is None:
            return _KronLinear._forward(ctx, x, weight, bias, w1, right, left)
        # under autocast: everything in its dtype, as autocast's own matmuls would run; autograd casts the
        # returned gradients back to the inputs' dtypes
        cast: list[Any] = [None if t is None else t.to(half) for t in (x, weight, bias, w1, right, left)]
        with torch.autocast(x.device.type, enabled=False):
            return _KronLinear._forward(ctx, *cast)

    @staticmethod
    def _forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, w1: torch.Tensor,
                 right: torch.Tensor, left: torch.Tensor | None) -> torch.Tensor:
        (a, c), k = w1.shape, right.shape[0]
        x2 = x.reshape(-1, x.shape[-1])
        tokens, d = x2.shape[0], x2.shape[1] // c
        out = F.linear(x2, weight, bias)
        z1 = _swap(x2.reshape(tokens * c, d) @ right.T, tokens, c)   # (c, T, k)
        z2 = _swap((w1 @ z1.view(c, -1)).view(a * tokens, k), a, tokens)  # (T, a, k)
        if left is None:
            out.view(tokens, a, -1).add_(z2)
        else:
            out.view(tokens * a, -1).addmm_(z2.view(tokens * a, k), left.T)
        ctx.save_for_backward(x, weight, w1, right, left, z1)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, w1, right, left, z1 = ctx.saved_tensors
        need_x, need_w, need_b, need_w1, need_r, need_l = ctx.needs_input_grad
        (a, c), (k, d) = w1.shape, right.shape
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        tokens = g2.shape[0]
        x2, ga = x.reshape(tokens * c, d), g2.reshape(tokens * a, -1)  # rows (t, j) / (t, i), row-major
        grad_x = grad_w = grad_b = grad_w1 = grad_r = grad_l = None
        gz2 = ga if left is None else ga @ left            # dL/dz2 as (T a, k); W2 full: g itself
        if left is not None and need_l:
            z2 = _swap((w1 @ z1.view(c, -1)).view(a * tokens, k), a, tokens)
            grad_l = ga.T @ z2.view(tokens * a, k)
        gz2 = _swap(gz2, tokens, a)                        # (a, T, k)
        if need_w1:
            grad_w1 = gz2.view(a, -1) @ z1.view(c, -1).T
        gz1 = _swap((w1.T @ gz2.view(a, -1)).view(c * tokens, k), c, tokens).view(tokens * c, k)
        if need_r:
            grad_r = gz1.T @ x2
        if need_x:
            grad_x = (g2 @ weight).view(tokens * c, d).addmm_(gz1, right).view(x.shape)
        if need_w:
            grad_w = g2.T @ x.reshape(tokens, -1)
        if need_b:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, grad_w1, grad_r, grad_l
