"""LoRA: dW = (alpha / r) * B @ A (PEFT LoraConfig semantics).

`init`: peft (PEFT's): A kaiming-uniform(a=sqrt 5) over fan-in `in`, B = 0. official (the RandLoRA vision
code, github.com/PaulAlbert31/RandLoRA@4ac565e vision_language/src/rand_lora.py:291-294, used as
x @ B @ A at :490): the input-side factor is zero and the output-side one kaiming-uniform(a=sqrt 5) on a
(1, r, out) tensor, so its fan-in is r * out: here A = 0 and B ~ U(-1/sqrt(r out), 1/sqrt(r out)).
dW = 0 at the start either way.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLayer, Validator, common_hp, one_of, register
from .peft_spec import NO_EXTRA_MODULES, PeftSpec, number


@register("lora")
class LoRA(AdapterLayer):
    """A (r x in) kaiming-uniform, B (out x r) zero, so training starts from the base model."""

    label: ClassVar[str] = "LoRA"

    peft: ClassVar[PeftSpec] = PeftSpec(
        "LORA", "LoraConfig", {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"},
        lambda hp: {"r": hp["r"], "lora_alpha": number(hp["alpha"]), "lora_dropout": hp["dropout"],
                    "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
                    "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {}},
        lambda c: {"r": c["r"], "alpha": c["lora_alpha"], "dropout": c["lora_dropout"]},
        {**NO_EXTRA_MODULES, "use_rslora": False, "use_dora": False, "bias": "none", "lora_bias": False,
         "fan_in_fan_out": False, "layer_replication": None, "target_parameters": None,
         "trainable_token_indices": None, "alora_invocation_tokens": None, "use_bdlora": None,
         "arrow_config": None, "kasa_config": None},
        patterns=True)  # peft 0.21.2 peft/tuners/lora/config.py LoraConfig.rank_pattern/alpha_pattern

    hp_spec: ClassVar[dict[str, tuple[Any, Validator]]] = {
        **common_hp(alpha=8.0), "init": ("peft", one_of("peft", "official"))}

    @classmethod
    def num_params(cls, in_features: int, out_features: int, **hp: Any) -> int:
        return hp["r"] * (in_features + out_features)

    @classmethod
    def max_rank(cls, in_features: int, out_features: int, **hp: Any) -> int:
        return min(hp["r"], in_features, out_features)

    def init_adapter(self, factory: dict[str, Any], shared: nn.Module | None) -> None:
        r = self.hp["r"]
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        # B is (out x r) as in PEFT, stored column-major so that B^T is contiguous (see adapter_factors)
        self.lora_B = nn.Parameter(torch.empty(r, self.out_features, **factory).T)

    def reset_adapter(self) -> None:
        if self.hp["init"] == "official":
            nn.init.zeros_(self.lora_A)
            bound = 1.0 / math.sqrt(self.hp["r"] * self.out_features)  # kaiming a=sqrt5: 1/sqrt(fan_in)
            nn.init.uniform_(self.lora_B, -bound, bound)
            return
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def adapter_factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Never materialise dW: two thin matmuls cost r * (in + out) per token; the scale is applied to
        # the thin (tokens x r) intermediate, not to a (tokens x out) result.
        return F.linear(x, self.lora_A) * self.scaling, self.lora_B

    def factored_macs(self, tokens: int) -> int:
        return tokens * self.hp["r"] * (self.in_features + self.out_features)

    def delta_macs(self) -> int:
        return self.out_features * self.in_features * self.hp["r"]
