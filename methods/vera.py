"""VeRA: dW = alpha * diag(lambda_b) B diag(lambda_d) A from frozen random A, B (PEFT VeraConfig).

Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation" (arXiv 2310.11454), as PEFT 0.21.2
implements it (peft/tuners/vera/layer.py:242-246 `get_delta_weight`, :279-285 `forward`):
  A        (r x in)   random, frozen,
  B        (out x r)  random, frozen,
  lambda_d (r)        trainable, `d_initial` (0.1) at init (layer.py:138),
  lambda_b (out)      trainable, zero at init, so dW == 0 (layer.py:139),
so a layer trains r + out numbers whatever its width: VeRA reaches small budgets, not large ones.

One pair (A, B) is generated per injection from `seed` (PEFT's `projection_prng_key`), sized for the
largest targeted layer (element-wise max of (out, in), model.py:124-145) and sliced per layer
(A[:, :in], B[:out, :]); both are non-persistent buffers, regenerated from the seed and never written
into adapter files (PEFT's `save_projection=False`). `alpha` is a rankbench extension for the base
class's common hyper-parameters: an overall scale of dW, 1 (PEFT, which has none) unless set.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import (
    AdapterLayer,
    Validator,
    adapter_dtype_for,
    common_hp,
    integer,
    positive_int,
    real_number,
    register,
)
from .peft_spec import NO_EXTRA_MODULES, PeftSpec


def kaiming_uniform(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """U(-b, b) with b = sqrt(6 / fan_in), fan_in = shape[1], drawn in fp32 on the CPU: PEFT's
    `_kaiming_init` (peft/tuners/vera/model.py:49-75), so a seed gives bit-identical bases."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


class VeraBases(nn.Module):
    """The shared frozen A (r, in_max) and B (out_max, r), as non-persistent buffers."""

    vera_A: torch.Tensor
    vera_B: torch.Tensor

    def __init__(self, out_features: int, in_features: int, r: int, seed: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if torch.device(device).type == "meta":
            a, b = torch.empty(r, in_features, device="meta"), torch.empty(out_features, r, device="meta")
        else:   # A first, then B, from one generator (peft/tuners/vera/model.py:155-157)
            gen = torch.Generator(device="cpu").manual_seed(seed)
            a = kaiming_uniform((r, in_features), gen)
            b = kaiming_uniform((out_features, r), gen)
        self.register_buffer("vera_A", a.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("vera_B", b.to(device=device, dtype=dtype), persistent=False)


def _to_peft(hp: dict[str, Any]) -> dict[str, Any]:
    if hp["alpha"] != 1.0:
        raise ValueError(f"vera with alpha={hp['alpha']} has no PEFT VeraConfig equivalent (PEFT has no "
                         "scale); only alpha=1 exports")
    return {"r": hp["r"], "projection_prng_key": hp["seed"], "save_projection": False,
            "vera_dropout": hp["dropout"], "d_initial": hp["d_initial"], "fan_in_fan_out": False,
            "bias": "none", "init_weights": True}


@register("vera")
class VeRA(AdapterLayer):
    """Trainable lambda_d (r) and lambda_b (out) scale frozen shared random bases."""

    bases: VeraBases

    label: ClassVar[str] = "VeRA"

    # PEFT VeraConfig defaults (peft/tuners/vera/config.py:70, 82, 101-102): r 256, key 0, dropout 0, d 0.1
    hp_spec: ClassVar[dict[str, tuple[Any, Validator]]] = {
        **common_hp(alpha=1.0), "r": (256, positive_int), "seed": (0, integer),
        "d_initial": (0.1, real_number)}

    peft: ClassVar[PeftSpec] = PeftSpec(
        "VERA", "VeraConfig", {"vera_lambda_b": "vera_lambda_b", "vera_lambda_d": "vera_lambda_d"}, _to_peft,
        lambda c: {"r": c["r"], "dropout": c["vera_dropout"], "seed": c["projection_prng_key"],
                   "d_initial": c["d_initial"]},
        {**NO_EXTRA_MODULES, "bias": "none", "fan_in_fan_out": False},
        random=("vera_A", "vera_B"))

    @classmethod
    def num_params(cls, in_features: int, out_features: int, **hp: Any) -> int:
        return hp["r"] + out_features

    @classmethod
    def max_rank(cls, in_features: int, out_features: int, **hp: Any) -> int:
        return min(hp["r"], in_features, out_features)

    @classmethod
    def make_shared(cls, linears: list[nn.Linear], hp: dict[str, Any]) -> nn.Module:
        """One pair of bases for all targets, sized by the element-wise max of their (out, in)."""
        w = linears[0].weight
        return VeraBases(max(lin.out_features for lin in linears), max(lin.in_features for lin in linears),
                         hp["r"], hp["seed"], w.device, adapter_dtype_for(w.dtype))

    def init_adapter(self, factory: dict[str, Any], shared: nn.Module | None) -> None:
        if shared is None:
            shared = self.make_shared([self.base_layer], self.hp)
        if not isinstance(shared, VeraBases):
            raise TypeError(f"vera needs VeraBases as shared state, got {type(shared).__name__}")
        self.bases = shared
        self.vera_lambda_d = nn.Parameter(torch.empty(self.hp["r"], **factory))
        self.vera_lambda_b = nn.Parameter(torch.empty(self.out_features, **factory))

    def reset_adapter(self) -> None:
        nn.init.constant_(self.vera_lambda_d, self.hp["d_initial"])
        nn.init.zeros_(self.vera_lambda_b)

    def basis_a(self) -> torch.Tensor:
        """This layer's slice of the shared A: (r, in); with per-layer ranks (inject's rank_pattern) the
        shared A has the largest r's rows and each layer takes its own r."""
        return self.bases.vera_A[: self.hp["r"], : self.in_features]

    def basis_b(self) -> torch.Tensor:
        """This layer's slice of the shared B: (out, r)."""
        return self.bases.vera_B[: self.out_features, : self.hp["r"]]

    def scaled_b(self) -> torch.Tensor:
        """alpha * diag(lambda_b) B (out x r): the update's output-side factor."""
        return self.basis_b() * (self.vera_lambda_b[:, None] * self.hp["alpha"])

    def delta_weight(self) -> torch.Tensor:
        return self.scaled_b() @ (self.vera_lambda_d[:, None] * self.basis_a())

    def adapter_factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x A^T (tokens x r) scaled by lambda_d, then through diag(lambda_b) B: r (in + out) per token
        return F.linear(x, self.basis_a()) * self.vera_lambda_d, self.scaled_b()

    def factored_macs(self, tokens: int) -> int:
        return tokens * self.hp["r"] * (self.in_features + self.out_features)

    def delta_macs(self) -> int:
        return self.out_features * self.in_features * self.hp["r"]
