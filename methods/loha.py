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

from .base import AdapterLayer, Validator, common_hp, register
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
                    "use_effective_conv2d": False, "init_weights": True, "rank_pattern": {}, "alpha_pattern": {}},
        lambda c: {"r": c.get("r", 8), "alpha": c.get("alpha", 8)},
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

    def factored_macs(self, tokens: int) -> int:
        r2, n = self.hp["r"] ** 2, self.in_features + self.out_features
        return (tokens + 1) * r2 * n

    def delta_macs(self) -> int:
        return self.out_features * self.in_features * (2 * self.hp["r"] + 2)
