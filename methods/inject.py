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
def largest_rank(shapes: Sequence[tuple[int, int]]) -> int:
    """The largest valid `r` on Linear layers of these (in, out) shapes: the smallest larger dimension.

    A rank above a layer's larger dimension adds parameters (and memory: LoRA r=100000 on a 128-wide layer
    is 25.6M parameters) but no rank or structure, for every method here, so it is refused, not wrapped.
    """
    return min(max(i, o) for i, o in shapes)


def check_rank(name: str, hp: dict[str, Any], layers: dict[str, nn.Linear]) -> None:
    """Refuse an `r` above `largest_rank` of `layers` before anything is allocated, naming the layer."""
    shapes = {n: (m.in_features, m.out_features) for n, m in layers.items()}
    _check_rank(name, hp, shapes)


def _check_rank(name: str, hp: dict[str, Any], shapes: dict[str, tuple[int, int]]) -> None:
    r = hp.get("r")
    if r is None or not shapes:
        return
    layer, (n_in, n_out) = min(shapes.items(), key=lambda kv: max(kv[1]))
    limit = largest_rank([(n_in, n_out)])
    if r > limit:
        where = f" ({layer!r})" if layer else ""
        raise ValueError(f"{name}: r={r} is too large for Linear({n_in}, {n_out}){where}: the largest valid "
                         f"r there is {limit} (a rank above a layer's larger dimension adds parameters but "
                         f"no rank); valid: 1..{limit}")


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
    count equals this closed form never compares against a count no model could be given."""
    cls = get_method(name)
    hp = cls.resolve_hp(hp)
    targets = find_targets(model, target_modules)
    check_rank(name, hp, targets)
    return sum(cls.num_params(m.in_features, m.out_features, **hp) for m in targets.values())


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

    Only adapter parameters require grad afterwards; a task head must be unfrozen by the caller.
    """
    cls = get_method(name)
    hp = cls.resolve_hp(hp)
    if adapter_layers(model):
        raise ValueError("the model already has adapters; inject into a fresh copy of the base model")
    targets = find_targets(model, target_modules)
    check_rank(name, hp, targets)
    model.requires_grad_(False)
    shared = cls.make_shared(list(targets.values()), hp)
    for module_name, linear in targets.items():
        _set_submodule(model, module_name, cls(linear, shared=shared, **hp))
    log.info("%s: wrapped %d Linear layers (%s), %d adapter parameters",
             name, len(targets), ", ".join(f"{k}={v}" for k, v in hp.items()), count_trainable(model))
    return list(targets)


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
    if not layers:
        raise ValueError("the model has no adapter layers; call methods.inject first")
    configs = {(layer.method, json.dumps(layer.hp, sort_keys=True)) for layer in layers.values()}
    if len(configs) > 1:
        raise ValueError(f"adapter layers disagree on method/hyper-parameters: {sorted(configs)}")
    first = next(iter(layers.values()))
    return first.method, dict(first.hp)


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write `path/adapter_model.safetensors` (trainable tensors only) and `path/adapter_config.json`.

    Frozen state (base weights, RandLoRA's bases) is never written: it is rebuilt from the base model
    and the seed, so the file holds ~4 bytes per fp32 trainable parameter. Returns the weights path.
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
    """Load an adapter saved by `save_adapter`, injecting it first if `model` is a plain base model."""
    path = Path(path)
    config = json.loads((path / CONFIG_FILE).read_text())
    method, hp, modules = config["method"], config["hp"], config["modules"]
    layers = adapter_layers(model)
    if not layers:
        exact = "|".join(re.escape(m) for m in modules)
        inject(model, method, exact, **hp)
        layers = adapter_layers(model)
    have_method, have_hp = _single_config(layers)
    if (have_method, have_hp, sorted(layers)) != (method, get_method(method).resolve_hp(hp), sorted(modules)):
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
