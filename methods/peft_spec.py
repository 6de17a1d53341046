"""How a method is spelled by Hugging Face PEFT: the counterpart every method class carries as `peft`.

Export (runners/engine/peft_files.py), the bench (runners/bench.py) and the parity tests read a method's
PEFT config type, its field mapping and its tensor names from here, so a new method brings its own
counterpart and no list elsewhere names it. PEFT is imported inside `config` and `with_defaults` only (a
runtime dependency of the PEFT-backed methods alone).
Field names are those of PEFT 0.21.2's config dataclasses (peft/tuners/*/config.py) and state dicts
(`PeftModel.save_pretrained` keys `base_model.model.<module>.<tensor>`), checked by
tests/runners/test_export.py.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

#: task heads travel in head.safetensors (runners/engine/peft_files.py), not as PEFT `modules_to_save`
NO_EXTRA_MODULES: dict[str, Any] = {"modules_to_save": None}


@dataclass(frozen=True)
class PeftSpec:
    """One method's PEFT counterpart: config class and fields both ways, tensor names, random bases."""

    peft_type: str                                       # PeftConfig.peft_type, e.g. "LORA"
    # the class in the `peft` namespace, e.g. "LoraConfig"
    config_class: str
    tensors: dict[str, str]                              # our parameter name -> PEFT's state-dict leaf
    to_peft: Callable[[dict[str, Any]], dict[str, Any]]  # our resolved hp -> PEFT config fields
    from_peft: Callable[[dict[str, Any]], dict[str, Any]]  # PEFT config (with_defaults) -> our hp
    refuse: dict[str, Any] = field(default_factory=dict)  # fields changing outputs in ways we cannot follow
    random: tuple[str, ...] = ()                         # frozen random bases, regenerated from the seed
    patterns: bool = False                               # the config has rank_pattern / alpha_pattern
    #: our pattern hp -> PEFT's field of that name where it differs (FourierFT: n_frequency_pattern)
    pattern_names: dict[str, str] = field(default_factory=dict)
    # fields set to the target modules (IA3's feedforward)
    targets_fields: tuple[str, ...] = ()

    def config(self, hp: dict[str, Any], target_modules: list[str] | str, **extra: Any) -> Any:
        """The `peft.<config_class>` for our resolved hp on `target_modules` (imports peft: tests/bench
        only)."""
        import peft

        own = {f: target_modules for f in self.targets_fields}
        return getattr(peft, self.config_class)(target_modules=target_modules, **self.to_peft(hp), **own,
                                                **extra)

    def with_defaults(self, saved: dict[str, Any]) -> dict[str, Any]:
        """A saved adapter_config.json completed with the config class's own defaults, as PEFT reads it
        (`PeftConfig.from_pretrained` builds the dataclass from the file's keys); `from_peft` reads this."""
        import peft

        declared = fields(getattr(peft, self.config_class))
        return {**{f.name: f.default for f in declared if f.default is not MISSING}, **saved}

    def pattern_name(self, ours: str) -> str:
        """PEFT's name of our pattern hp (`rank_pattern` -> FourierFT's `n_frequency_pattern`)."""
        return self.pattern_names.get(ours, ours)   # "": PEFT has no such field

    def our_tensor(self, peft_leaf: str) -> str | None:
        """Our parameter name for PEFT's state-dict leaf (`lora_A.weight` -> `lora_A`); None if unknown."""
        return {theirs: ours for ours, theirs in self.tensors.items()}.get(peft_leaf)


def number(x: float) -> float | int:
    """16.0 -> 16 in the config file (PEFT declares alphas as int; any number works)."""
    return int(x) if float(x).is_integer() else float(x)


def same(names: tuple[str, ...]) -> dict[str, str]:
    """Tensor names PEFT spells as we do."""
    return {n: n for n in names}
