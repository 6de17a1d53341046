"""Wrapping a model's Linear layers, counting, merging, saving and loading adapters.

Everything here goes through the `AdapterLayer` interface, so it is the same code for every method.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .base import AdapterLayer, get_method

log = logging.getLogger(__name__)

Targets = str | Sequence[str]
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


# ----------------------------------------------------------------------------- target matching
def _plain_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Linear modules by name, excluding the frozen base layers already inside adapters."""
    inside = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, AdapterLayer))
    return {n: m for n, m in model.named_modules()
            if n and isinstance(m, nn.Linear) and not (inside and n.startswith(inside))}


def _no_match_error(what: str, linears: dict[str, nn.Linear]) -> ValueError:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
    examples = list(linears)[:3]
    if not linears:
        return ValueError(f"{what} matched no nn.Linear: the model has no (unwrapped) nn.Linear modules")
    return ValueError(
        f"{what} matched no nn.Linear. Targets are name suffixes (a list) or a regex (a string, full match). "
        f"Linear leaf names in this model: {leaves[:12]}; e.g. full names {examples}"
    )


def find_targets(model: nn.Module, target_modules: Targets) -> dict[str, nn.Linear]:
    """Linear modules selected by `target_modules`: a list of name suffixes or one regex (full match).

    Every suffix must match at least one Linear, so a typo fails loudly instead of training nothing.
    """
    linears = _plain_linears(model)
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        found = {n: m for n, m in linears.items() if pattern.fullmatch(n)}
        if not found:
            raise _no_match_error(f"target regex {target_modules!r}", linears)
        return found
    suffixes = list(target_modules)
    if not suffixes or not all(isinstance(s, str) and s for s in suffixes):
        raise ValueError(
            f"target_modules must be a regex string or a non-empty list of names, got {suffixes!r}")
    found = {}
    for suffix in suffixes:
        hits = {n: m for n, m in linears.items() if n == suffix or n.endswith("." + suffix)}
        if not hits:
            raise _no_match_error(f"target {suffix!r}", linears)
        found.update(hits)
    return {n: found[n] for n in linears if n in found}  # model order, not target order


# ----------------------------------------------------------------------------- rank limit
def largest_rank(shapes: Sequence[tuple[int, int]], name: str | None = None) -> int:
    """The largest valid `r` on Linear layers of these (in, out) shapes: the smallest larger dimension
    (or the smallest `knob_limit` of method `name`, for a method whose `r` is no rank).

    A rank above a layer's larger dimension adds parameters (and memory: LoRA r=100000 on a 128-wide layer
    is 25.6M parameters) but no rank or structure, for every method here, so it is refused, not wrapped.
    """
    limit = get_method(name).knob_limit if name else lambda i, o: max(i, o)
    return min(limit(i, o) for i, o in shapes)


def check_rank(name: str, hp: dict[str, Any], layers: dict[str, nn.Linear]) -> None:
    """Refuse an `r` above `largest_rank` of `layers` before anything is allocated, naming the layer."""
    shapes = {n: (m.in_features, m.out_features) for n, m in layers.items()}
    _check_rank(name, hp, shapes)


def _check_rank(name: str, hp: dict[str, Any], shapes: dict[str, tuple[int, int]]) -> None:
    r = hp.get("r")
    if r is None or not shapes:
        return
    layer, (n_in, n_out) = min(shapes.items(), key=lambda kv: largest_rank([kv[1]], name))
    limit = largest_rank([(n_in, n_out)], name)
    if r > limit:
        where = f" ({layer!r})" if layer else ""
        raise ValueError(f"{name}: r={r} is too large for Linear({n_in}, {n_out}){where}: the largest valid "
                         f"r there is {limit} ({get_method(name).knob_limit_reason}); valid: 1..{limit}")


# ----------------------------------------------------------------------------- per-layer ranks
#: hp that give some layers their own value (exact module name -> value), overriding the global one. The
#: precedent is PEFT's LoraConfig.rank_pattern / alpha_pattern (peft 0.21.2 peft/tuners/lora/config.py:
#: 524-529, 737-754), here with exact module names only. As there, a layer with its own r keeps the
#: global alpha (scaling alpha / r_layer) unless alpha_pattern gives it its own. The budget solver uses
#: rank_pattern to land on a budget between two global ranks.
RANK_PATTERN = "rank_pattern"
PATTERNS = {RANK_PATTERN: "r", "alpha_pattern": "alpha"}

Overrides = dict[str, dict[str, Any]]  # module name -> {hp name: its own value}


def split_pattern(hp: dict[str, Any]) -> tuple[dict[str, Any], Overrides]:
    """(hp without the patterns, per-layer overrides {module: {"r": 9, "alpha": 18.0}}); none is {}."""
    rest = {k: v for k, v in hp.items() if k not in PATTERNS}
    overrides: Overrides = {}
    for key, knob in PATTERNS.items():
        pattern = hp.get(key)  # optional: most runs give every layer the same hp
        if pattern is None:
            continue
        if not isinstance(pattern, dict) or not all(isinstance(k, str) for k in pattern):
            raise ValueError(f"{key} must map module names to {knob} values, e.g. "
                             f"{{'encoder.layers.0.fc1': 9}}; got {pattern!r}")
        for module, value in pattern.items():
            overrides.setdefault(module, {})[knob] = value
    return rest, overrides


def join_pattern(hp: dict[str, Any], per_layer: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`hp` plus the patterns of the layers whose r or alpha differ from it (inverse of `layer_hps`)."""
    out = dict(hp)
    for key, knob in PATTERNS.items():
        pattern = {n: h[knob] for n, h in per_layer.items() if knob in h and h[knob] != hp[knob]}
        if pattern:
            out[key] = pattern
    return out


def layer_hps(name: str, hp: dict[str, Any], overrides: Overrides,
              layers: dict[str, nn.Linear]) -> dict[str, dict[str, Any]]:
    """Each target's resolved hp (the resolved global `hp` with its overrides), every r checked against
    its own layer before anything is allocated."""
    unknown = sorted(set(overrides) - set(layers))
    if unknown:
        raise ValueError(f"{RANK_PATTERN}/alpha_pattern name modules that are not targets: {unknown[:3]}; "
                         f"valid: exact names of targeted layers, e.g. {list(layers)[:2]}")
    cls = get_method(name)
    out = {n: cls.resolve_hp({**hp, **overrides[n]}) if n in overrides else hp for n in layers}
    for r in sorted({h["r"] for h in out.values() if "r" in h}):  # per rank, the tightest layer is named
        _check_rank(name, {"r": r}, {n: (m.in_features, m.out_features) for n, m in layers.items()
                                     if out[n]["r"] == r})
    return out


def shared_hp(hp: dict[str, Any], per_layer: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The hp `make_shared` sizes shared state with: `r` is the largest layer rank and `r_min` the
    smallest (random bases with the most rows, RandLoRA's with the most bases); the global hp when uniform."""
    ranks = {h["r"] for h in per_layer.values() if "r" in h}
    if not ranks or ranks == {hp["r"]}:
        return hp
    return {**hp, "r": max(ranks), "r_min": min(ranks)}


# ----------------------------------------------------------------------------- counting
def num_params(name: str, in_features: int, out_features: int, **hp: Any) -> int:
    """Closed-form trainable parameters of `name` on Linear(in_features, out_features); allocates nothing."""
    cls = get_method(name)
    for key, value in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    hp = cls.resolve_hp(hp)
    _check_rank(name, hp, {"": (in_features, out_features)})
    return cls.num_params(in_features, out_features, **hp)


def num_params_model(model: nn.Module, name: str, target_modules: Targets, **hp: Any) -> int:
    """Closed-form adapter parameters for a whole model; needs only shapes, so meta-device models work.

    Refuses what `inject` refuses (an `r` too large for a target), so the runner's check that the wrapped
    count equals this closed form never compares against a count no model could be given. A
    `rank_pattern` hp (see `PATTERNS`) is counted layer by layer."""
    cls = get_method(name)
    hp, pattern = split_pattern(hp)
    hp = cls.resolve_hp(hp)
    targets = find_targets(model, target_modules)
    per_layer = layer_hps(name, hp, pattern, targets)
    return sum(cls.num_params(m.in_features, m.out_features, **per_layer[n]) for n, m in targets.items())


def count_trainable(model: nn.Module) -> int:
    """Parameters with requires_grad (each shared tensor once): what the optimizer actually updates."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- wrapping
def wrap_linear(name: str, base: nn.Linear, **hp: Any) -> AdapterLayer:
    """One Linear wrapped by method `name`; the base is frozen (shared state sized for this layer alone)."""
    cls = get_method(name)
    hp = cls.resolve_hp(hp)
    if isinstance(base, nn.Linear):
        check_rank(name, hp, {"": base})
    return cls(base, shared=cls.make_shared([base], hp), **hp)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Wrapped layers by module name (e.g. for measuring the rank of dW on a sample of them)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def inject(model: nn.Module, name: str, target_modules: Targets, **hp: Any) -> list[str]:
    """Wrap the matched Linear layers in place and freeze everything else; returns the wrapped names.

    Only adapter parameters require grad afterwards; a task head must be unfrozen by the caller. A
    `rank_pattern` ({module name: r}) / `alpha_pattern` give those layers their own r / alpha (`PATTERNS`).
    """
    cls = get_method(name)
    hp, pattern = split_pattern(hp)
    hp = cls.resolve_hp(hp)
    if adapter_layers(model):
        raise ValueError("the model already has adapters; inject into a fresh copy of the base model")
    targets = find_targets(model, target_modules)
    per_layer = layer_hps(name, hp, pattern, targets)
    model.requires_grad_(False)
    shared = cls.make_shared(list(targets.values()), shared_hp(hp, per_layer))
    for module_name, linear in targets.items():
        layer = cls(linear, shared=shared, **per_layer[module_name])
        layer.global_hp = hp  # what save_adapter records (with the layers whose r differs)
        _set_submodule(model, module_name, layer)
    log.info("%s: wrapped %d Linear layers (%s%s), %d adapter parameters", name, len(targets),
             ", ".join(f"{k}={v}" for k, v in hp.items()),
             f"; {len(pattern)} layers with their own r/alpha" if pattern else "", count_trainable(model))
    return list(targets)


def leave_untrained(model: nn.Module, target_modules: Targets) -> list[str]:
    """Adapters of the layers `target_modules` selects (suffixes or a regex, as `inject`) keep their dW and
    count as trainable but get no gradient (`AdapterLayer.untrained_forward`); returns their names."""
    layers = adapter_layers(model)
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        names = [n for n in layers if pattern.fullmatch(n)]
    else:
        names = [n for n in layers if any(n == s or n.endswith("." + s) for s in target_modules)]
    if not names:
        raise ValueError(f"untrained adapter targets {target_modules!r} match no adapter layer; "
                         f"adapted layers: {list(layers)[:3]} ...")
    for name in names:
        layers[name].update_trained = False
    return names


def merge(model: nn.Module) -> None:
    """Fold every dW into its base weight (for inference); explicit, never a side effect."""
    for layer in adapter_layers(model).values():
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Undo `merge`, so training can continue on the factored adapter."""
    for layer in adapter_layers(model).values():
        layer.unmerge()


# ----------------------------------------------------------------------------- saving and loading
def _single_config(layers: dict[str, AdapterLayer]) -> tuple[str, dict[str, Any]]:
    """(method, hp with the patterns of the layers whose r/alpha differ): what `inject` rebuilds them
    from. Layers wrapped one by one (wrap_linear) carry no injection hp: their own hp is the global one."""
    if not layers:
        raise ValueError("the model has no adapter layers; call methods.inject first")
    configs = {(layer.method, json.dumps(getattr(layer, "global_hp", layer.hp), sort_keys=True))
               for layer in layers.values()}
    if len(configs) > 1:
        raise ValueError(f"adapter layers disagree on method/hyper-parameters: {sorted(configs)}")
    first = next(iter(layers.values()))
    hp = dict(getattr(first, "global_hp", first.hp))
    return first.method, join_pattern(hp, {n: layer.hp for n, layer in layers.items()})


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write `path/adapter_model.safetensors` (trainable tensors only) and `path/adapter_config.json`.

    Frozen state (base weights, RandLoRA's bases) is never written: it is rebuilt from the base model
    and the seed, so the file holds ~4 bytes per fp32 trainable parameter. The config's `hp` holds the
    `rank_pattern` / `alpha_pattern` of layers with their own r / alpha. Returns the weights path.
    """
    layers = adapter_layers(model)
    method, hp = _single_config(layers)
    tensors = {f"{ln}.{pn}": p.detach().to("cpu").contiguous()
               for ln, layer in layers.items() for pn, p in layer.adapter_parameters()}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {"format": "rankbench-adapter", "version": 1, "method": method, "hp": hp,
              "modules": list(layers), "num_params": sum(t.numel() for t in tensors.values())}
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"method": method})
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return path / WEIGHTS_FILE


def load_adapter(model: nn.Module, path: str | Path) -> list[str]:
    """Load an adapter saved by `save_adapter`, injecting it first if `model` is a plain base model.
    (Files from before per-layer ranks have no patterns in `hp`: every layer has the global hp.)"""
    path = Path(path)
    config = json.loads((path / CONFIG_FILE).read_text())
    method, hp, modules = config["method"], config["hp"], config["modules"]
    layers = adapter_layers(model)
    if not layers:
        exact = "|".join(re.escape(m) for m in modules)
        inject(model, method, exact, **hp)
        layers = adapter_layers(model)
    have_method, have_hp = _single_config(layers)
    plain, overrides = split_pattern(hp)
    plain = get_method(method).resolve_hp(plain)
    want = join_pattern(plain, {n: {**plain, **o} for n, o in overrides.items()})
    if (have_method, have_hp, sorted(layers)) != (method, want, sorted(modules)):
        raise ValueError(f"adapter at {path} ({method}, {hp}, {len(modules)} layers) does not match the "
                         f"model's adapters ({have_method}, {have_hp}, {len(layers)} layers)")
    if any(layer.merged for layer in layers.values()):
        raise ValueError("unmerge the model before loading adapter weights into it")
    _copy_tensors(layers, load_file(str(path / WEIGHTS_FILE)))
    return list(layers)


@torch.no_grad()
def _copy_tensors(layers: dict[str, AdapterLayer], tensors: dict[str, torch.Tensor]) -> None:
    params = {f"{ln}.{pn}": p for ln, layer in layers.items() for pn, p in layer.adapter_parameters()}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"adapter file does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, p in params.items():
        if tensors[key].shape != p.shape:
            raise ValueError(f"{key}: file has shape {tuple(tensors[key].shape)}, model {tuple(p.shape)}")
        p.copy_(tensors[key])
