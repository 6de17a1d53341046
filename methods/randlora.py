"""RandLoRA: a full-rank update from frozen random bases and learned diagonal scalings (PEFT RandLoraConfig).

For a layer with d = min(in, out), D = max(in, out) and n = ceil(d / r) bases:
  A     (r x d)      one random matrix, frozen, shared by every basis j,
  B     (D x n x r)  n random matrices B_j, frozen,
  lambda (r x n)     trainable, zero at init (dW == 0),
  gamma  (n x d)     trainable, 1 / d at init,
  dW (on the (D x d) side) = (alpha / r) * B.reshape(D, n r) @ S.reshape(r n, d),
  S[k, j] = lambda[k, j] * A[k] * gamma[j]  (element-wise over the d columns)
and dW is transposed when out < in, so the trainable scalings always sit on the smaller side.

Two conventions of the official code (github.com/PaulAlbert31/RandLoRA@4ac565e) are hyper-parameters:
`sqrt_n` divides the scaling by sqrt(n), as the vendored PEFT its GLUE and commonsense code runs does
(peft/src/peft/tuners/randlora/layer.py:119; PEFT 0.21.2 has alpha / r). `init: official` starts lambda at
1 / max(n, r) and gamma at 0, as its vision code does (vision_language/src/rand_lora.py:287-290: its (n, r)
scaling is filled with 1 / max of its shape, its (n, d) one stays zero); `peft`: lambda 0, gamma 1 / d. As in
PEFT, the two flattenings pair B's (j, k) column order with S's (k, j) row order; that is still n * r
rank-one terms with distinct random bases, and copying it keeps parity with PEFT's tensors.

One pair (A, B) is generated per injection from `seed`, sized for the largest targeted layer (element-wise
max of (out, in) over the targets, as PEFT does) and sliced per layer. Bases are non-persistent buffers:
they are regenerated from the seed and never written into adapter files.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLayer, Validator, adapter_dtype_for, boolean, common_hp, integer, one_of, register
from .peft_spec import NO_EXTRA_MODULES, PeftSpec, number, same


def num_bases(min_dim: int, r: int) -> int:
    """ceil(min_dim / r): enough rank-r bases for the update to reach full rank."""
    return -(-min_dim // r)


class RandomBases(nn.Module):
    """The shared frozen bases A (r, 1, d_max) and B (D_max, n_max, r), as non-persistent buffers.

    With per-layer ranks (`r_min` < `r`), n_max = ceil(d_max / r_min): each layer slices r_layer rows of A,
    and n_layer bases of r_layer columns of B (methods/inject.py `rank_pattern`).
    """

    randlora_A: torch.Tensor
    randlora_B: torch.Tensor

    def __init__(self, out_features: int, in_features: int, r: int, seed: int, sparse: bool,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 r_min: int | None = None) -> None:
        super().__init__()
        big, small = max(out_features, in_features), min(out_features, in_features)
        n = num_bases(small, r if r_min is None else r_min)
        if torch.device(device).type == "meta":
            a, b = torch.empty(r, 1, small, device="meta"), torch.empty(big, n, r, device="meta")
        else:
            make = ternary_bases if sparse else kaiming_bases
            a, b = make(r, small, big, n, torch.Generator(device="cpu").manual_seed(seed))
        self.register_buffer("randlora_A", a.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("randlora_B", b.to(device=device, dtype=dtype), persistent=False)


Bases = tuple[torch.Tensor, torch.Tensor]


def kaiming_bases(r: int, small: int, big: int, n: int, gen: torch.Generator) -> Bases:
    """Kaiming-uniform A then the n B_j one by one (the order fixes the values), each normalised to std 1.

    Drawn and normalised in bfloat16 on the CPU, as PEFT 0.21 does wherever bf16 is available: the same
    seed then gives bit-identical bases to PEFT's, on any machine (PEFT itself falls back to fp16).
    """

    def draw(*shape: int) -> torch.Tensor:
        empty = torch.empty(shape, dtype=torch.bfloat16)
        return nn.init.kaiming_uniform_(empty, a=math.sqrt(5), generator=gen)

    a = draw(r, 1, small)
    b = torch.cat([draw(big, 1, r) for _ in range(n)], dim=1)
    return a / a.std(), b / b.std()


def ternary_bases(r: int, small: int, big: int, n: int, gen: torch.Generator) -> Bases:
    """Sparse bases: -1 / 0 / +1 with probabilities 1/6, 2/3, 1/6 (Achlioptas), normalised to std 1."""

    def ternary(u: torch.Tensor) -> torch.Tensor:
        t = torch.zeros_like(u)
        t[u < 1 / 6] = -1.0
        t[u > 5 / 6] = 1.0
        return t / t.std()

    a = torch.rand((r, 1, small), generator=gen)
    b = torch.rand((big, n, r), generator=gen)
    return ternary(a), ternary(b)


def peft_alpha(hp: dict[str, Any]) -> float:
    """PEFT 0.21's randlora_alpha for our hp; sqrt_n (a per-layer 1/sqrt(n)) has no PEFT 0.21 field."""
    if hp.get("sqrt_n"):
        raise ValueError("randlora sqrt_n=true (scaling alpha / r / sqrt(n), the official code's vendored "
                         "PEFT) has no PEFT 0.21 counterpart: only sqrt_n=false adapters can be written in "
                         "PEFT's format")
    return hp["alpha"]


@register("randlora")
class RandLoRA(AdapterLayer):
    """Trainable lambda (r x n) and gamma (n x min(in, out)); n = ceil(min / r) grows as r shrinks."""

    bases: RandomBases

    label: ClassVar[str] = "RandLoRA"

    # bases are not written (PEFT's save_projection=False): PEFT regenerates them from projection_prng_key
    peft: ClassVar[PeftSpec] = PeftSpec(
        "RANDLORA", "RandLoraConfig", same(("randlora_lambda", "randlora_gamma")),
        lambda hp: {"r": hp["r"], "randlora_alpha": number(peft_alpha(hp)), "randlora_dropout": hp["dropout"],
                    "projection_prng_key": hp["seed"], "sparse": hp["sparse"], "very_sparse": False,
                    "save_projection": False, "bias": "none", "fan_in_fan_out": False, "init_weights": True},
        lambda c: {"r": c["r"], "alpha": c["randlora_alpha"], "dropout": c["randlora_dropout"],
                   "seed": c["projection_prng_key"], "sparse": c["sparse"]},
        {**NO_EXTRA_MODULES, "very_sparse": False, "bias": "none", "fan_in_fan_out": False},
        random=("randlora_A", "randlora_B"))

    hp_spec: ClassVar[dict[str, tuple[Any, Validator]]] = {
        **common_hp(alpha=640.0), "seed": (0, integer), "sparse": (False, boolean),
        "sqrt_n": (False, boolean), "init": ("peft", one_of("peft", "official"))}

    @classmethod
    def num_params(cls, in_features: int, out_features: int, **hp: Any) -> int:
        small = min(in_features, out_features)
        return num_bases(small, hp["r"]) * (hp["r"] + small)

    @classmethod
    def make_shared(cls, linears: list[nn.Linear], hp: dict[str, Any]) -> nn.Module:
        """One pair of bases for all targets, sized by the element-wise max of their (out, in); with
        per-layer ranks `hp` carries the largest (`r`) and the smallest (`r_min`, see inject.shared_hp)."""
        out_max = max(lin.out_features for lin in linears)
        in_max = max(lin.in_features for lin in linears)
        w = linears[0].weight
        return RandomBases(out_max, in_max, hp["r"], hp["seed"], hp["sparse"], w.device,
                           adapter_dtype_for(w.dtype), r_min=hp.get("r_min"))  # absent: one r for all

    @classmethod
    def budget_candidates(cls, shapes: list[tuple[int, int]], fixed: dict[str, Any]) -> list[dict]:
        # r beyond the largest min(in, out) only adds parameters (one basis of growing rank)
        return [{"r": r} for r in range(1, max(min(i, o) for i, o in shapes) + 1)]

    def init_adapter(self, factory: dict[str, Any], shared: nn.Module | None) -> None:
        if shared is None:
            shared = self.make_shared([self.base_layer], self.hp)
        if not isinstance(shared, RandomBases):
            raise TypeError(f"randlora needs RandomBases as shared state, got {type(shared).__name__}")
        self.bases = shared
        r, small = self.hp["r"], min(self.in_features, self.out_features)
        self.n_bases = num_bases(small, r)
        if self.hp["sqrt_n"]:
            self.scaling /= math.sqrt(self.n_bases)
        self.randlora_lambda = nn.Parameter(torch.empty(r, self.n_bases, **factory))
        self.randlora_gamma = nn.Parameter(torch.empty(self.n_bases, small, **factory))

    def reset_adapter(self) -> None:
        if self.hp["init"] == "official":
            nn.init.constant_(self.randlora_lambda, 1.0 / max(self.randlora_lambda.shape))
            nn.init.zeros_(self.randlora_gamma)
            return
        nn.init.zeros_(self.randlora_lambda)
        nn.init.constant_(self.randlora_gamma, 1.0 / self.randlora_gamma.shape[1])

    def basis_a(self) -> torch.Tensor:
        """This layer's slice of the shared A: (r, 1, d)."""
        return self.bases.randlora_A[: self.hp["r"], :, : min(self.in_features, self.out_features)]

    def basis_b(self) -> torch.Tensor:
        """This layer's slice of the shared B, flattened: (D, n r)."""
        big = max(self.in_features, self.out_features)
        return self.bases.randlora_B[:big, : self.n_bases, : self.hp["r"]].flatten(1)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_flat (D x n r), S (r n x d)) with dW on the (D x d) side = B_flat @ S (unscaled)."""
        s = self.randlora_lambda[:, :, None] * self.basis_a() * self.randlora_gamma[None]  # (r, n, d)
        return self.basis_b(), s.flatten(0, 1)

    def delta_weight(self) -> torch.Tensor:
        b, s = self.factors()
        dw = b @ s
        return (dw if self.out_features >= self.in_features else dw.T) * self.scaling

    def adapter_factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Factored: ~ n r (in + out) per token, about a full matmul of the layer since n r >= min(in, out).
        # The base class usually prefers the merged path for RandLoRA (see `use_merged_path`).
        b, s = self.factors()
        if self.out_features >= self.in_features:   # dW = B S: x -> x S^T -> (x S^T) B^T
            return F.linear(x, s) * self.scaling, b
        return x @ b * self.scaling, s.T            # dW = S^T B^T: x -> x B -> (x B) S

    # -- the merged path (methods/fastpath.py) -------------------------------------------------------
    def delta_split(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        # out < in: dW = (s S^T) B^T with B frozen, so the merged path saves x B (tokens x n r, about
        # tokens x out) instead of x (tokens x in) -- the activation memory PEFT's RandLoRA has.
        # out >= in: dW = B (s S), B the frozen left factor (`delta_left`).
        b, s = self.factors()
        if self.out_features >= self.in_features:
            return s * self.scaling, None
        return s.T * self.scaling, b.T

    def delta_left(self) -> torch.Tensor | None:
        return self.basis_b() if self.out_features >= self.in_features else None

    def delta_right(self) -> torch.Tensor | None:
        return None if self.out_features >= self.in_features else self.basis_b().T

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        b, s = self.factors()                   # W + s B S (or its transpose) in one GEMM, no dW tensor
        if self.out_features >= self.in_features:
            return torch.addmm(weight, b, s, alpha=self.scaling)
        return torch.addmm(weight, s.T, b.T, alpha=self.scaling)

    def delta_param_grads(self, grad_left: torch.Tensor) -> list[torch.Tensor]:
        """From H = B^T G (r n x d), the gradient of s S that the merged path projects once (out >= in:
        B^T G or (g B)^T x; out < in: g^T (x B) = H^T), element-wise, as S[k, j] = lambda[k, j] A[k] gamma[j]:
        d lambda[k, j] = s sum_i H[k, j, i] A[k, i] gamma[j, i],
        d gamma[j, i] = s sum_k H[k, j, i] lambda[k, j] A[k, i]."""
        h = grad_left if self.out_features >= self.in_features else grad_left.T
        lam, gamma = self.randlora_lambda, self.randlora_gamma
        h = h.to(lam.dtype).reshape(*lam.shape, -1) * (self.basis_a() * self.scaling)   # H * A: (r, n, d)
        return [(h * gamma).sum(-1), (h * lam[:, :, None]).sum(0)]

    def delta_keep_allowance(self, half: torch.dtype | None) -> int:
        # The factored form (PEFT's) keeps S (n r x d) for backward besides what the merged path keeps;
        # under autocast also a half copy of B (D x n r). A kept dW (out x in) may use that much.
        nr, small = self.n_bases * self.hp["r"], min(self.in_features, self.out_features)
        return nr * small + (nr * max(self.in_features, self.out_features) if half is not None else 0)

    def merged_backward_macs(self, tokens: int, keep: bool) -> int:
        # out >= in: G = g^T x and H = B^T G, plus a rebuild of W + dW for the input gradient unless kept --
        # or, not kept, g B, H = (g B)^T x and g W + (g B)(s S) (methods/fastpath.py `factored_backward`).
        # out < in: x B in the forward and g^T (x B), plus the rebuild unless kept.
        nr, i, o = self.n_bases * self.hp["r"], self.in_features, self.out_features
        if o < i:
            return tokens * nr * (i + o) + (0 if keep else self.delta_macs())
        dense = tokens * i * o + nr * i * o + (0 if keep else self.delta_macs())
        return dense if keep else min(dense, tokens * nr * (o + 2 * i))

    def merged_forward_macs(self, tokens: int, backward_builds: bool) -> int:
        # out < in: (x B)(s S)^T from the x B that backward keeps (methods/fastpath.py `factored_forward`)
        build = self.delta_macs()
        if backward_builds and self.out_features < self.in_features:
            return min(build, tokens * build // self.in_features)
        return build

    def factored_macs(self, tokens: int) -> int:
        nr = self.n_bases * self.hp["r"]
        return tokens * nr * (self.in_features + self.out_features) + nr * min(self.in_features,
                                                                               self.out_features)

    def delta_macs(self) -> int:
        return self.out_features * self.in_features * self.n_bases * self.hp["r"]

