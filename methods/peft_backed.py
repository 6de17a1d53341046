"""PEFT-backed methods: any Hugging Face PEFT tuner that wraps an nn.Linear, run by PEFT's own layer code.

A method of this family is one file, `conf/method/<name>.yaml`, with a `peft:` block that names the PEFT
config class, its fixed fields and the integer field that sets its size (the budget solver's knob, which
rankbench calls `r`). Nothing else names it: every such file registers one `PeftLayer` subclass here when
`methods` is imported, so the runner, budgets, sweeps, export and report treat it like the native five.

Each targeted Linear gets the tuner layer that PEFT's own `inject_adapter_in_model` builds on it (one
layer at a time, so per-layer knob values need no PEFT pattern at training time); its trainable tensors
are re-registered on the `PeftLayer` under names carrying the method prefix (`dora_lora_A_weight`), and
its forward, merge and unmerge are PEFT's. Counting builds the layer on the meta device. dW is read off
the adapted layer as an affine map (`delta_weight`), so rank measurements work for any tuner whose
adapted layer is x -> x (W + dW)^T + b.

Tuners whose state is shared across layers (PEFT refuses them in `inject_adapter_in_model`: VB-LoRA,
TinyLoRA, UniLoRA, PVeRA, FRoD) cannot be built one layer at a time and are not supported.
"""
from __future__ import annotations

import functools
import logging
import math
import warnings
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
import yaml
from torch import nn

from .base import (
    AdapterLayer,
    Validator,
    adapter_dtype_for,
    boolean,
    integer,
    positive_int,
    probability,
    real_number,
    register,
)
from .fastpath import DeltaCache
from .peft_spec import PeftSpec

log = logging.getLogger(__name__)

#: where method configs live (the Hydra `method` group); a `peft:` block makes one a PEFT-backed method
CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf" / "method"
ADAPTER = "default"   # PEFT's adapter name inside each layer (its default, peft/mapping.py)
SLOT = "layer"        # the attribute the one-Linear holder keeps the layer under
#: how large the knob may get on Linear(in, out) (a config's `knob_max`), beyond which it adds no structure
KNOB_MAX = {"max": lambda i, o: max(i, o), "min": lambda i, o: min(i, o), "in": lambda i, o: i,
            "out": lambda i, o: o, "in*out": lambda i, o: i * o}
#: validators of our hp names; any other hp is checked against its default's type (`_validator`)
VALIDATORS: dict[str, Validator] = {"r": positive_int, "dropout": probability, "alpha": real_number,
                                    "seed": integer}


class PeftConfigError(ValueError):
    """A PEFT-backed method config that cannot work (unknown class, field, or a tuner that cannot wrap)."""


def _peft() -> Any:
    import peft  # a runtime dependency of this family only (pyproject `dependencies`)

    return peft


def _validator(key: str, default: Any) -> Validator:
    if key in VALIDATORS:
        return VALIDATORS[key]
    return boolean if isinstance(default, bool) else integer if isinstance(default, int) else real_number


class PeftLayer(AdapterLayer):
    """A Linear adapted by one PEFT tuner layer; subclasses are made from config files (`register_config`)."""

    has_cost_model: ClassVar[bool] = False
    _spec: ClassVar[PeftSpec]   # built on first use of `peft` (_LazySpec)
    tuner: Any                  # PEFT's BaseTunerLayer (kept out of the module tree, see __init__)
    #: the PEFT config class (in the `peft` namespace), its fixed fields and our hp -> its field names
    config_class: ClassVar[str] = ""
    fixed: ClassVar[dict[str, Any]] = {}
    hp_fields: ClassVar[dict[str, str]] = {}
    #: PEFT fields set to the list of targeted modules (IA3's feedforward_modules)
    targets_fields: ClassVar[tuple[str, ...]] = ()
    #: PEFT's per-layer field for the knob (e.g. LoRA's rank_pattern), or "" where it has none
    pattern_field: ClassVar[str] = ""
    alpha_pattern_field: ClassVar[str] = ""
    knob_max: ClassVar[str] = "max"
    #: rank(dW) <= rank_per_knob * r; 0: full rank (min(in, out))
    rank_per_knob: ClassVar[int] = 0
    #: the count is a + b r on each shape (declared in the config with its source, checked at 3 values)
    count_linear: ClassVar[bool] = False
    #: the tuner layer's attribute holding the knob per adapter: a value PEFT adjusts (OFT picks another
    #: block size that divides in_features) is refused instead of recorded wrongly
    knob_attr: ClassVar[str] = ""
    #: valid `r` are multiples of this (HRA: PEFT's identity init pairs the reflections), and why
    knob_multiple: ClassVar[int] = 1
    knob_note: ClassVar[str] = ""
    #: rank(dW) reaches max_rank for random adapter weights (False: an upper bound, FourierFT's random
    #: locations)
    max_rank_exact: ClassVar[bool] = True
    #: the adapted layer equals the base at init exactly (False: up to rounding, HRA's paired reflections)
    init_exact: ClassVar[bool] = True

    def __init__(self, base_layer: nn.Linear, *, shared: nn.Module | None = None, **hp: Any) -> None:
        nn.Module.__init__(self)
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"{self.method} wraps nn.Linear modules, got {type(base_layer).__name__}")
        self.hp = self.resolve_hp(hp)
        self.base_layer = base_layer.requires_grad_(False)
        self.merged = False
        self.delta_cache = DeltaCache()
        self.adapter_dtype = adapter_dtype_for(base_layer.weight.dtype)
        tuner = build_tuner(type(self), self.hp, base_layer)
        object.__setattr__(self, "tuner", tuner)   # not a child: its tensors are registered by our names
        for peft_name, param in trainable(tuner):
            self.register_parameter(our_name(self.method, peft_name), param)
        self.adapter_dropout = nn.Identity()

    # -- counting, knobs, structure -------------------------------------------------------------------
    @classmethod
    def num_params(cls, in_features: int, out_features: int, **hp: Any) -> int:
        """PEFT's own count on a meta Linear; where PEFT's counts at three knob values lie on a line (LoRA,
        DoRA, FourierFT, HRA), that line, since a build can cost O(in * out) (FourierFT's index draw)."""
        rest = tuple(sorted((k, v) for k, v in hp.items() if k != "r"))
        line = _line(cls.method, in_features, out_features, rest) if "r" in hp and cls.count_linear else None
        if line is not None:
            return line[0] + line[1] * hp["r"]
        return _meta_count(cls.method, in_features, out_features, tuple(sorted(hp.items())))

    @classmethod
    def resolve_hp(cls, hp: dict[str, Any]) -> dict[str, Any]:
        resolved = super().resolve_hp(hp)
        if "r" in resolved and resolved["r"] % cls.knob_multiple:
            raise ValueError(f"{cls.method}: r must be a multiple of {cls.knob_multiple} ({cls.knob_note}); "
                             f"got {resolved['r']}")
        return resolved

    @classmethod
    def tensor_shapes(cls, shape: tuple[int, int],
                      hp: dict[str, Any]) -> tuple[tuple[str, tuple[int, ...]], ...]:
        return meta_tensors(cls.method, *shape, tuple(sorted(hp.items())))

    @classmethod
    def knob_limit(cls, in_features: int, out_features: int) -> int:
        return KNOB_MAX[cls.knob_max](in_features, out_features)

    @classmethod
    def max_rank(cls, in_features: int, out_features: int, **hp: Any) -> int:
        full = min(in_features, out_features)
        return min(cls.rank_per_knob * hp["r"], full) if cls.rank_per_knob else full

    @classmethod
    def budget_candidates(cls, shapes: list[tuple[int, int]], fixed: dict[str, Any]) -> list[dict]:
        """Every knob value PEFT accepts on all `shapes` (OFT's block size must divide in_features)."""
        top = min(cls.knob_limit(i, o) for i, o in shapes)
        return [{"r": r} for r in knob_grid(top) if _valid_everywhere(cls, shapes, {**fixed, "r": r})]

    @classmethod
    def config_fields(cls, hp: dict[str, Any], targets: list[str] | str) -> dict[str, Any]:
        """The PEFT config's fields for our resolved hp on `targets` (target_modules excluded)."""
        fields = {**cls.fixed, **{cls.hp_fields[k]: v for k, v in hp.items() if k in cls.hp_fields}}
        return {**fields, **{f: targets for f in cls.targets_fields}}

    # -- behaviour: PEFT's layer --------------------------------------------------------------------------
    def init_adapter(self, factory: dict[str, Any], shared: nn.Module | None) -> None:
        """Unused: PEFT's layer creates and initialises the tensors (`build_tuner`)."""

    def reset_adapter(self) -> None:
        """Unused: PEFT's layer initialises its tensors when it is built (dW = 0 for every shipped tuner)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tuner(x)

    def delta_weight(self) -> torch.Tensor:
        """dW = (adapted layer's weight) - W, read off the linear map x -> x (W + dW)^T that the adapted
        layer is with its bias set aside and dropout off: its rows at the identity. One in x in forward;
        for rank measurements and tests. Exact where PEFT leaves W untouched (dW = 0 at init)."""
        base, was = self.base_layer, self.tuner.training
        bias = base.bias
        self.tuner.train(False)
        base.bias = None  # type: ignore[assignment]  # set aside: the rows are then W + dW alone
        try:
            rows = self.tuner(torch.eye(self.in_features, dtype=base.weight.dtype, device=base.weight.device))
        finally:
            base.bias = bias
            self.tuner.train(was)
        return rows.T.to(self.adapter_dtype) - base.weight.to(self.adapter_dtype)

    def train(self, mode: bool = True) -> PeftLayer:
        self.tuner.train(mode)
        super().train(mode)
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> PeftLayer:
        self.tuner._apply(fn, recurse)   # the tuner's own buffers (BOFT's permutations, OFT's indices)
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.tuner.merge(adapter_names=[ADAPTER])
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.tuner.unmerge()
            self.merged = False

    def extra_repr(self) -> str:
        return f"{self.method} (PEFT {self.config_class}): {self.hp}, merged={self.merged}"


# ----------------------------------------------------------------------------- PEFT's own layer
def build_tuner(cls: type[PeftLayer], hp: dict[str, Any], base: nn.Linear) -> nn.Module:
    """The PEFT tuner layer `inject_adapter_in_model` puts on `base` (in place: `base` becomes its
    base_layer); a tuner that cannot wrap it is one PeftConfigError line."""
    holder = nn.Module()
    holder.add_module(SLOT, base)
    config = peft_config(cls, hp, [SLOT])
    try:
        _peft().inject_adapter_in_model(config, holder)
    except (ValueError, TypeError, RuntimeError, NotImplementedError, AssertionError) as err:
        raise PeftConfigError(f"{cls.method}: PEFT's {cls.config_class} cannot wrap "
                              f"Linear({base.in_features}, "
                              f"{base.out_features}) with {config_text(cls, hp)}: "
                              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    tuner = getattr(holder, SLOT)
    _fp32_adapters(tuner, base.weight.dtype)
    if tuner is base:
        raise PeftConfigError(f"{cls.method}: PEFT's {cls.config_class} left nn.Linear({base.in_features}, "
                              f"{base.out_features}) unwrapped: the tuner does not adapt Linear layers")
    used = getattr(tuner, cls.knob_attr, {}).get(ADAPTER, hp.get("r")) if cls.knob_attr else hp.get("r")
    if used != hp.get("r"):
        raise PeftConfigError(f"{cls.method}: PEFT's {cls.config_class} changed r={hp['r']} "
                              f"({cls.hp_fields['r']}) "
                              f"to {used} on Linear({base.in_features}, {base.out_features}); valid values "
                              f"divide in_features={base.in_features}")
    return tuner


def _fp32_adapters(tuner: nn.Module, base_dtype: torch.dtype) -> None:
    """Adapters of a half-precision base train in fp32, as `get_peft_model(autocast_adapter_dtype=True)`
    does (peft 0.21.2 peft/tuners/tuners_utils.py `_cast_adapter_dtype`); `inject_adapter_in_model` does
    not."""
    if adapter_dtype_for(base_dtype) != base_dtype:
        for _, param in trainable(tuner):
            param.data = param.data.to(torch.float32)


def peft_config(cls: type[PeftLayer], hp: dict[str, Any], targets: list[str] | str) -> Any:
    """The `peft.<config_class>` for our resolved hp; a field the class lacks is one PeftConfigError line."""
    peft = _peft()
    config_type = getattr(peft, cls.config_class, None)
    if not isinstance(config_type, type) or not issubclass(config_type, peft.PeftConfig):
        known = sorted(n for n in dir(peft) if n.endswith("Config") and n != "PeftConfig")
        raise PeftConfigError(f"{cls.method}: {cls.config_class!r} is not a PEFT config class (peft "
                              f"{peft.__version__}); valid: {', '.join(known)}")
    try:
        return config_type(target_modules=targets, **cls.config_fields(hp, targets))
    except (TypeError, ValueError) as err:
        raise PeftConfigError(f"{cls.method}: PEFT's {cls.config_class} refuses {config_text(cls, hp)}: "
                              f"{str(err).splitlines()[0]}") from err


def config_text(cls: type[PeftLayer], hp: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in cls.config_fields(hp, [SLOT]).items())


def trainable(tuner: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(PEFT's name, parameter) of the tuner's trainable tensors, base layer excluded."""
    return [(n, p) for n, p in tuner.named_parameters()
            if p.requires_grad and not n.startswith("base_layer.")]


def our_name(method: str, peft_name: str) -> str:
    """`lora_A.default.weight` -> `dora_lora_A_weight`: the method prefix, PEFT's name, no adapter name."""
    return f"{method}_" + peft_name.replace(f".{ADAPTER}", "").replace(".", "_")


@functools.lru_cache(maxsize=65536)
def _meta_count(method: str, in_features: int, out_features: int, hp_items: tuple) -> int:
    """Trainable parameters PEFT's layer has on Linear(in, out), built on the meta device (no allocation)."""
    return sum(math.prod(shape) for _, shape in meta_tensors(method, in_features, out_features, hp_items))


@functools.lru_cache(maxsize=65536)
def meta_tensors(method: str, in_features: int, out_features: int, hp_items: tuple
                 ) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(our name, shape) of the trainable tensors PEFT's layer has on a meta Linear(in, out): counting and
    the budget solver's structure check share one build (FourierFT's draws its indices: O(in * out))."""
    from .base import get_method

    cls = cast(type[PeftLayer], get_method(method))
    with warnings.catch_warnings():  # the solver tries hundreds of values: PEFT's note on each one it would
        warnings.simplefilter("ignore")  # change (OFT's "Invalid oft_block_size") is build_tuner's refusal
        tuner = build_tuner(cls, dict(hp_items), nn.Linear(in_features, out_features, device="meta"))
    return tuple((our_name(method, n), tuple(p.shape)) for n, p in trainable(tuner))


#: every knob value up to this is a budget candidate; above it, a grid with GRID_RATIO steps (0.1%: one global
#: value lands within the budget tolerance without a per-layer pattern)
DENSE = 1024
GRID_RATIO = 1.001


def knob_grid(top: int) -> list[int]:
    """1..min(top, DENSE), then values GRID_RATIO apart up to `top` (FourierFT's knob reaches in * out)."""
    values = list(range(1, min(top, DENSE) + 1))
    while values[-1] < top:
        values.append(min(top, max(values[-1] + 1, int(values[-1] * GRID_RATIO))))
    return values


@functools.lru_cache(maxsize=4096)
def _line(method: str, in_features: int, out_features: int, rest: tuple) -> tuple[int, int] | None:
    """(a, b) with PEFT's count = a + b r at three valid knob values (the smallest two and the largest), or
    None where they are not on a line or a probe is refused (OFT: quadratic in its block size)."""
    from .base import get_method

    cls = cast(type[PeftLayer], get_method(method))
    step = cls.knob_multiple
    top = cls.knob_limit(in_features, out_features) // step * step
    probes = sorted({step, 2 * step, top})
    try:
        counts = [_meta_count(method, in_features, out_features, tuple(sorted((*rest, ("r", r)))))
                  for r in probes]
    except ValueError:
        return None
    if len(probes) < 3:
        return None
    b = (counts[1] - counts[0]) // (probes[1] - probes[0])
    a = counts[0] - b * probes[0]
    return (a, b) if all(a + b * r == c for r, c in zip(probes, counts, strict=True)) else None


def _valid_everywhere(cls: type[PeftLayer], shapes: list[tuple[int, int]], hp: dict[str, Any]) -> bool:
    """PEFT accepts the knob value on every shape, and it trains something (OFT's block size 1 does not)."""
    try:
        hp = cls.resolve_hp(hp)
        if not all(cls.num_params(i, o, **hp) for i, o in shapes):
            return False
    except ValueError:   # PeftConfigError, or a knob value resolve_hp refuses (HRA's odd r)
        return False
    return True


# ----------------------------------------------------------------------------- the PEFT counterpart
class _LazySpec:
    """`cls.peft`, built on first use (it builds a PEFT layer, so `import methods` does not import peft)."""

    def __get__(self, obj: Any, cls: type[PeftLayer]) -> PeftSpec:
        if "_spec" not in cls.__dict__:
            cls._spec = _spec(cls)
        return cls._spec


def _spec(cls: type[PeftLayer]) -> PeftSpec:
    """Tensor names in PEFT's saved files come from PEFT's own `get_peft_model_state_dict`."""
    peft = _peft()
    hp = cls.resolve_hp({})
    holder = nn.Module()
    holder.add_module(SLOT, nn.Linear(128, 128, device="meta"))
    model = peft.get_peft_model(holder, peft_config(cls, hp, [SLOT]))
    tensors = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            saved = next(iter(peft.get_peft_model_state_dict(model, state_dict={name: param})))
            peft_name = name.split(f"{SLOT}.", 1)[1]
            tensors[our_name(cls.method, peft_name)] = saved.split(f"{SLOT}.", 1)[1]
    fields = {**cls.fixed}
    back = {v: k for k, v in cls.hp_fields.items()}
    return PeftSpec(
        str(model.peft_config[ADAPTER].peft_type.value), cls.config_class, tensors,
        lambda hp: {k: v for k, v in cls.config_fields(hp, []).items() if k not in cls.targets_fields},
        lambda c: {ours: c[theirs] for theirs, ours in back.items()},
        fields, patterns=bool(cls.pattern_field),
        pattern_names={"rank_pattern": cls.pattern_field, "alpha_pattern": cls.alpha_pattern_field},
        targets_fields=cls.targets_fields)


# ----------------------------------------------------------------------------- registration
#: `peft:` keys that set the PeftLayer attribute of the same name; absent ones keep PeftLayer's default
ATTRIBUTE_KEYS = ("knob_max", "rank_per_knob", "knob_multiple", "knob_note", "knob_attr", "count_linear",
                  "init_exact", "max_rank_exact", "targets_fields")
#: every key a `peft:` block may have (README "PEFT-backed methods"); config and label are required
BLOCK_KEYS = ("config", "label", "knob", "hp", "fields", "pattern", "alpha_pattern", *ATTRIBUTE_KEYS)


def register_config(name: str, config: dict[str, Any]) -> type[PeftLayer]:
    """Register method `name` from its config file's content (the top-level hp defaults and `peft:`)."""
    spec = config["peft"]
    _check_block(name, spec)
    knob = spec.get("knob")  # absent: no size knob (IA3)
    hp_fields = {**({"r": knob} if knob else {}), **(spec.get("hp") or {})}
    attrs = {key: spec[key] for key in ATTRIBUTE_KEYS if key in spec}
    attrs.update({
        "label": spec["label"], "config_class": spec["config"], "fixed": dict(spec.get("fields") or {}),
        "hp_fields": hp_fields, "targets_fields": tuple(attrs.get("targets_fields") or ()),
        "pattern_field": spec.get("pattern") or "", "alpha_pattern_field": spec.get("alpha_pattern") or "",
        "budget_knobs": ("r",) if knob else (), "layer_patterns": bool(spec.get("pattern")),
        "hp_spec": {k: (config[k], _validator(k, config[k])) for k in hp_fields},
        "peft": _LazySpec(), "definition": dict(spec),
        "__doc__": f"{spec['label']}: PEFT's {spec['config']} (conf/method/{name}.yaml).",
    })
    largest = attrs.get("knob_max", PeftLayer.knob_max)
    attrs["knob_limit_reason"] = (f"PEFT's {spec['config']} takes {knob} up to {largest} of the layer's "
                                  f"(in, out)") if knob else ""
    cls = type(f"Peft_{name}", (PeftLayer,), attrs)
    register(name)(cls)
    return cls


def _check_block(name: str, spec: dict[str, Any]) -> None:
    """One line for a `peft:` block key that would otherwise be ignored, or a required one missing."""
    unknown = sorted(set(spec) - set(BLOCK_KEYS))
    missing = [k for k in ("config", "label") if k not in spec]
    if unknown or missing:
        what = f"unknown key peft.{unknown[0]}" if unknown else f"peft.{missing[0]} is required"
        raise PeftConfigError(f"conf/method/{name}.yaml: {what}; a peft block has {', '.join(BLOCK_KEYS)}")


def check_definition(name: str, block: dict[str, Any] | None) -> None:
    """A run's `method.peft` must be the one `name` was registered from: the registry reads
    conf/method/<name>.yaml when `methods` is imported, so a command-line change of it would not act."""
    from .base import get_method

    cls = get_method(name)
    registered = getattr(cls, "definition", None)
    if block is not None and block != registered:
        where = (f"conf/method/{name}.yaml" if registered is not None
                 else "a conf/method/<name>.yaml of its own")
        raise PeftConfigError(f"method.peft of {name} differs from the definition it was registered "
                              f"with; a PEFT-backed method is defined by its file: edit {where} "
                              f"(or add a new one), "
                              f"not method.peft on the command line")


def _configs(folder: Path) -> dict[str, dict[str, Any]]:
    """Method configs with a `peft:` block, by method name, in name order."""
    out = {}
    for path in sorted(folder.glob("*.yaml")):
        content = yaml.safe_load(path.read_text()) or {}
        if isinstance(content, dict) and "peft" in content:
            out[content.get("name", path.stem)] = content
    return out


for _name, _config in _configs(CONFIG_DIR).items():
    register_config(_name, _config)
