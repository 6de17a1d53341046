"""Adapters that leave rankbench: a run's adapter in Hugging Face PEFT's format, the merged model, and back.

`python -m runners.export` (runners/export.py) writes the first two from a run directory. Our method layers
use PEFT's parameter shapes and RandLoRA's bases are bit-identical to PEFT's for the same seed
(tests/methods/test_method_parity.py), so the export is a renaming: no tensor is recomputed. Random bases
are not written (PEFT's `save_projection=False`); PEFT regenerates them from `projection_prng_key`.

Module names are those of the Hugging Face model: a task that wraps one in `tasks.models.HeadedModel`
(vision, language) has its `backbone.` prefix dropped, so the adapter loads on `AutoModel.from_pretrained`
of the base. The task head is no PEFT module: it goes beside the adapter as `head.safetensors` (the run's
parameter names, e.g. `heads.<dataset>.weight`), when the run saved one (see `save_head`).

`import_peft_adapter(model, DIR)` is the way back: it loads a PEFT folder of a supported method into a
rankbench model, so `python run.py ... +init_adapter=DIR trainer.max_steps=0` evaluates it like our runs.

Each method class carries its PEFT counterpart (`methods.get_method(name).peft`, methods/peft_spec.py: config
type and fields, tensor names, refused fields, random bases), so a new method exports with no edit here.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

import methods
import tasks
from methods.inject import CONFIG_FILE, PATTERNS, WEIGHTS_FILE, split_pattern
from methods.peft_spec import PeftSpec, number
from runners.engine.adapt import REFERENCES, is_head
from runners.record.results import FILENAME as RESULTS
from runners.record.results import read_results
from tasks.models import HeadedModel, resolve_model_path

log = logging.getLogger(__name__)

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
HEAD_FILE = "head.safetensors"
OURS = "adapter"                # the run's rankbench adapter folder (methods.save_adapter)
PEFT_PREFIX = "base_model.model."
BACKBONE = "backbone."          # tasks.models.HeadedModel keeps the Hugging Face model as `.backbone`


# ----------------------------------------------------------------------------- the method <-> PEFT spec
def exportable() -> list[str]:
    """Methods with a PEFT counterpart: every registered adapter (each class carries its `peft` spec)."""
    return [m for m in methods.available() if getattr(methods.get_method(m), "peft", None) is not None]


def _format(method: str) -> PeftSpec:
    if method in REFERENCES:
        raise ValueError(f"method={method} trains no adapter, so there is nothing to export; "
                         f"exportable methods: {', '.join(exportable())}")
    if method not in exportable():
        raise ValueError(f"method {method!r} has no PEFT export; "
                         f"exportable methods: {', '.join(exportable())}")
    return methods.get_method(method).peft


# ----------------------------------------------------------------------------- reading a run
@dataclass
class TrainedRun:
    """A finished run directory with a rankbench adapter in it."""

    run_dir: Path
    record: dict[str, Any]
    adapter: dict[str, Any]   # the rankbench adapter config (methods.save_adapter)

    @property
    def method(self) -> str:
        return self.adapter["method"]


def trained_run(run_dir: str | Path) -> TrainedRun:
    """The run at `run_dir`; a ValueError says in one line why it has no adapter to export."""
    run_dir = Path(run_dir)
    record = read_results(run_dir)
    if record is None:
        raise ValueError(f"{run_dir} is not a rankbench run directory: no readable {RESULTS} in it")
    run = record.get("run", {})
    if run.get("parts"):
        subs = ", ".join(str(run_dir / name) for name in run["parts"])
        raise ValueError(f"{run_dir} is a suite run with one adapter per dataset; export one of: {subs}")
    _format(run.get("method"))  # full / none / unknown methods fail here
    config_path = run_dir / OURS / CONFIG_FILE
    if not config_path.is_file():
        why = f"status {run.get('status')}" + (f": {str(run['error']).splitlines()[0]}"
                                               if run.get("error") else "")
        raise ValueError(f"{run_dir} has no trained adapter (no {OURS}/{config_path.name}; run {why})")
    adapter = json.loads(config_path.read_text())
    if adapter.get("format") != "rankbench-adapter":
        raise ValueError(f"{config_path} is not a rankbench adapter config "
                         f"(format {adapter.get('format')!r})")
    return TrainedRun(run_dir, record, adapter)


def build_base(record: dict[str, Any]) -> nn.Module:
    """The run's pretrained model (task head included), rebuilt from its resolved config."""
    return tasks.build(OmegaConf.create(record["run"]["config"]["task"])).build_model()


def _hf_name(module: str, strip: bool) -> str:
    return module.removeprefix(BACKBONE) if strip else module


# ----------------------------------------------------------------------------- export
def peft_config(run: TrainedRun) -> dict[str, Any]:
    """adapter_config.json: the method's PEFT fields plus what PeftModel needs to find the modules."""
    fmt, modules = _format(run.method), run.adapter["modules"]
    strip = all(m.startswith(BACKBONE) for m in modules)
    base = resolve_model_path(run.record["run"]["config"]["task"]["model"]["path"])
    return {"peft_type": fmt.peft_type, "task_type": None, "base_model_name_or_path": base,
            "target_modules": [_hf_name(m, strip) for m in modules], "inference_mode": True,
            "modules_to_save": None, **fmt.to_peft(run.adapter["hp"]), **_peft_patterns(run, fmt, strip),
            **{f: [_hf_name(m, strip) for m in modules] for f in fmt.targets_fields}}


def _peft_patterns(run: TrainedRun, fmt: PeftSpec, strip: bool) -> dict[str, dict[str, Any]]:
    r"""The layers with their own r / alpha (a budget between two global ranks) as PEFT's rank_pattern /
    alpha_pattern. PEFT reads each key as a regular expression matched against the end of a module name,
    `re.match(rf"(.*\.)?({key})$", name)` (peft 0.21.2 peft/utils/other.py:1524-1532, get_pattern_key), so
    every exact module name is escaped and names that one layer only."""
    own = {k: v for k, v in run.adapter["hp"].items() if k in PATTERNS and v}   # most runs have none
    if own and not (fmt.patterns and all(fmt.pattern_name(k) for k in own)):
        raise ValueError(f"{run.run_dir}: the adapter gives some layers their own r or alpha "
                         f"({', '.join(sorted(own))}: "
                         f"a budget between two global ranks), and PEFT's {fmt.config_class} has no "
                         f"rank_pattern; "
                         f"export a run with one r for every layer (e.g. budget=native or an explicit "
                         f"method.r)")
    return {fmt.pattern_name(k): {re.escape(_hf_name(m, strip)): number(v) for m, v in p.items()}
            for k, p in own.items()}


def peft_tensors(run: TrainedRun) -> dict[str, torch.Tensor]:
    """Our adapter tensors under PEFT's state-dict keys (no copy of the values, only new names)."""
    fmt = _format(run.method)
    strip = all(m.startswith(BACKBONE) for m in run.adapter["modules"])
    out = {}
    for key, tensor in load_file(str(run.run_dir / OURS / WEIGHTS_FILE)).items():
        module, _, param = key.rpartition(".")
        if param not in fmt.tensors:
            raise ValueError(f"{key}: {run.method} tensor {param!r} has no PEFT name; "
                             f"known: {sorted(fmt.tensors)}")
        out[f"{PEFT_PREFIX}{_hf_name(module, strip)}.{fmt.tensors[param]}"] = tensor
    return out


def export_peft(run_dir: str | Path, out: str | Path) -> Path:
    """Write the run's adapter as a PEFT adapter folder at `out`; returns `out`."""
    run, out = trained_run(run_dir), Path(out)
    config, tensors = peft_config(run), peft_tensors(run)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / PEFT_WEIGHTS), metadata={"format": "pt"})  # PEFT writes format=pt too
    (out / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    _copy_head(run, out)
    log.info("%s adapter of %s -> %s (%d tensors, %d bytes)", run.method, run.run_dir, out, len(tensors),
             (out / PEFT_WEIGHTS).stat().st_size)
    return out


def export_merged(run_dir: str | Path, out: str | Path) -> Path:
    """Write the base model with every dW merged in, as a plain `save_pretrained` folder at `out`."""
    run, out = trained_run(run_dir), Path(out)
    model = build_base(run.record)
    methods.load_adapter(model, run.run_dir / OURS)
    hf = merged_base(model)
    if not hasattr(hf, "save_pretrained"):
        raise ValueError(f"the run's backbone ({type(hf).__name__}) is not a Hugging Face model, "
                         f"so it has no "
                         f"save_pretrained: export the adapter instead and merge it with PEFT's "
                         f"merge_and_unload")
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)   # safetensors (transformers' default)
    _save_preprocessing(run.record, out)
    _copy_head(run, out)
    log.info("merged %s model of %s -> %s", run.method, run.run_dir, out)
    return out


@torch.no_grad()
def merged_base(model: nn.Module) -> nn.Module:
    """Merge every adapter and put the plain Linear back in its place; returns the Hugging Face model
    (the HeadedModel's backbone for headed tasks)."""
    for name, layer in methods.adapter_layers(model).items():
        layer.merge()
        model.set_submodule(name, layer.base_layer)
    return model.backbone if isinstance(model, HeadedModel) else model


def _save_preprocessing(record: dict[str, Any], out: Path) -> None:
    """Tokenizer / processor files next to the merged weights, so the folder is a complete model."""
    from transformers import AutoProcessor, AutoTokenizer

    base = resolve_model_path(record["run"]["config"]["task"]["model"]["path"])
    for loader in (AutoProcessor, AutoTokenizer):
        try:
            loader.from_pretrained(base).save_pretrained(out)
            return
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.debug("%s of %s: %s", loader.__name__, base, err)
    log.info("no tokenizer or processor found at %s; the merged folder holds the model only", base)


def save_trained(model: nn.Module, has_adapter: bool, head_prefixes: list[str], run_dir: Path) -> int:
    """Save what a run trained (`has_adapter`: its adapter layers, and its head); returns the adapter file
    size in bytes (0 when there is no adapter). The task head goes to run_dir/head.safetensors (outside
    adapter/: not counted in the adapter size)."""
    save_head(model, head_prefixes, run_dir)
    if has_adapter:
        path = run_dir / OURS
        methods.save_adapter(model, path)
        return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    return 0



def save_head(model: nn.Module, head_prefixes: list[str], run_dir: str | Path) -> Path | None:
    """Write the trained task head (parameters under `head_prefixes`) to `run_dir/head.safetensors`.

    The runner calls this beside methods.save_adapter; outside `adapter/`, so `adapter_file_bytes` stays
    the adapter's size. Returns None for tasks without a trainable head (CLIP, causal LMs)."""
    tensors = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters()
               if is_head(n, head_prefixes)}
    if not tensors:
        return None
    path = Path(run_dir) / HEAD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "rankbench-head"})
    return path


def _copy_head(run: TrainedRun, out: Path) -> None:
    head = run.run_dir / HEAD_FILE
    if head.is_file():
        shutil.copyfile(head, out / HEAD_FILE)
    elif run.record["run"]["config"]["task"].get("head_prefixes"):
        log.warning("%s has no %s (the run did not save its trained task head): exported the backbone "
                    "adapter only", run.run_dir, HEAD_FILE)


# ----------------------------------------------------------------------------- import
def read_peft_config(path: str | Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(method, our hp, PEFT config) of the PEFT adapter folder at `path`; unsupported settings fail."""
    path = Path(path)
    if not (path / PEFT_CONFIG).is_file():
        raise ValueError(f"{path} is not a PEFT adapter folder: it has no {PEFT_CONFIG}")
    config = json.loads((path / PEFT_CONFIG).read_text())
    of_type = [name for name in exportable()
               if methods.get_method(name).peft.peft_type == config.get("peft_type")]
    if not of_type:
        types = sorted({methods.get_method(name).peft.peft_type for name in exportable()})
        raise ValueError(f"{path}: PEFT type {config.get('peft_type')!r} is not supported; "
                         f"valid: {', '.join(types)}")
    # several methods may share a type (LORA: lora, peft_lora, dora): the first, in registry order, whose
    # fixed settings the file has (`refuse`: DoRA needs use_dora true, LoRA false)
    specs = {m: methods.get_method(m).peft for m in of_type}
    read = {m: s.with_defaults(config) for m, s in specs.items()}   # the file as each method's class reads it
    method = next((m for m in of_type if not _refused(specs[m], read[m])), of_type[0])
    fmt, config = specs[method], read[method]
    bad = _refused(fmt, config)
    if bad:
        raise ValueError(f"{path}: {fmt.peft_type} settings rankbench's {method} cannot evaluate: {bad} "
                         f"(supported: {fmt.refuse})")
    hp = fmt.from_peft(config)
    for key in (fmt.pattern_name(k) for k in PATTERNS):
        if key and config.get(key) and not fmt.patterns:
            raise ValueError(f"{path}: {key} is not a field of PEFT's {fmt.config_class}, "
                             f"so this file was not "
                             f"written by PEFT for {fmt.peft_type}; remove it")
    return method, hp, config


def _refused(fmt: PeftSpec, config: dict[str, Any]) -> dict[str, Any]:
    """The file's settings that differ from what the method fixes (`PeftSpec.refuse`)."""
    return {k: config[k] for k, ok in fmt.refuse.items() if config.get(k) not in (None, [], {}, ok)}


def our_patterns(config: dict[str, Any], hp: dict[str, Any], names: dict[str, str],
                 fmt: PeftSpec | None = None) -> dict[str, dict[str, Any]]:
    r"""PEFT's rank_pattern / alpha_pattern as ours ({our exact module name: value}, layers whose value
    differs from the global one): each module takes the first key that PEFT's get_pattern_key matches,
    `re.match(rf"(.*\.)?({key})$", module)` (peft 0.21.2 peft/utils/other.py:1524-1532).
    `names`: PEFT module name -> ours."""
    out = {}
    for key, knob in PATTERNS.items():
        pattern = config.get(fmt.pattern_name(key) if fmt else key) or {}
        own = {}
        for theirs, ours in names.items():
            match = next((k for k in pattern if re.match(rf"(.*\.)?({k})$", theirs)), None)
            if match is not None and pattern[match] != hp[knob]:
                own[ours] = pattern[match]
        if own:
            out[key] = own
    return out


def import_peft_adapter(model: nn.Module, path: str | Path) -> list[str]:
    """Load the PEFT adapter folder at `path` (and its head.safetensors, if any) into `model`.

    A plain base model gets the adapter injected first; a model with adapters already (the runner's,
    after `adapt`) must have the same method, hyper-parameters and layers, else a ValueError says which
    overrides make it match. Returns the adapted module names."""
    path = Path(path)
    method, hp, config = read_peft_config(path)
    fmt = methods.get_method(method).peft
    weights, bases = _split_peft_tensors(fmt, load_file(str(path / PEFT_WEIGHTS)), path)
    names = _module_names(model, {m for m, _ in weights})
    hp = {**hp, **our_patterns(config, hp, names, fmt)}
    if not methods.adapter_layers(model):
        methods.inject(model, method, "|".join(map(re.escape, sorted(set(names.values())))), **hp)
    layers = methods.adapter_layers(model)
    _check_layers(layers, method, hp, set(names.values()), path)
    _copy_weights(layers, {(names[m], fmt_name): t for (m, fmt_name), t in weights.items()}, path)
    _check_bases(layers, bases, hp, path)
    head = path / HEAD_FILE
    if head.is_file():
        _load_head(model, load_file(str(head)), head)
    log.info("imported %s adapter %s into %d layers", method, path, len(layers))
    return list(layers)


def _split_peft_tensors(fmt: PeftSpec, tensors: dict[str, torch.Tensor], path: Path
                        ) -> tuple[dict[tuple[str, str], torch.Tensor], dict[str, list[torch.Tensor]]]:
    """({(module, our param): tensor}, {random basis name: its saved copies}) from PEFT's state-dict keys."""
    leaves = {theirs: ours for ours, theirs in fmt.tensors.items()}
    weights, bases = {}, {}
    for key, tensor in tensors.items():
        rest = (key.removeprefix(PEFT_PREFIX) if key.startswith(PEFT_PREFIX)
                else key.removeprefix("base_model."))
        leaf = next((lf for lf in leaves if rest == lf or rest.endswith("." + lf)), None)
        if leaf is None and rest.rpartition(".")[2] in fmt.random:
            bases.setdefault(rest.rpartition(".")[2], []).append(tensor)  # PEFT saves a copy per layer + one
            continue
        if leaf is None or rest == leaf:
            raise ValueError(f"{path / PEFT_WEIGHTS}: unexpected tensor {key!r} for {fmt.peft_type} "
                             f"(expected base_model.model.<module>.{{{', '.join(leaves)}}})")
        weights[(rest[: -len(leaf) - 1], leaves[leaf])] = tensor
    return weights, bases


def _module_names(model: nn.Module, peft_modules: set[str]) -> dict[str, str]:
    """PEFT module name -> ours: the same, or under HeadedModel's `backbone.`; unknown names fail."""
    ours = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, methods.AdapterLayer))}
    names = {m: m if m in ours else BACKBONE + m for m in peft_modules}
    missing = sorted(m for m, n in names.items() if n not in ours)
    if missing:
        raise ValueError(f"the PEFT adapter targets modules this base model does not have as Linear layers: "
                         f"{missing[:3]} ({len(missing)} in all); is it for another base model?")
    return names


def _check_layers(layers: dict[str, methods.AdapterLayer], method: str, hp: dict[str, Any], wanted: set[str],
                  path: Path) -> None:
    """The model's adapters must be the file's: same method, output-relevant hp and layers."""
    first = next(iter(layers.values()))
    if first.method != method:
        raise ValueError(f"{path} is a {method} adapter but the model has {first.method} layers: "
                         f"run with method={method}")
    plain, own = split_pattern(hp)
    for name, layer in layers.items():
        diff = {k: v for k, v in {**plain, **own.get(name, {})}.items()
                if k != "dropout" and layer.hp[k] != v}
        if not diff:
            continue
        have = {k: layer.hp[k] for k in diff}
        if name in own:
            raise ValueError(f"{path} gives layer {name} its own {diff} but the model's layer has {have}: "
                             f"run at the budget the adapter was trained at")
        overrides = " ".join(f"method.{k}={v}" for k, v in diff.items())
        raise ValueError(f"{path} has {method} {diff} but the model's layers have {have}: "
                         f"run with {overrides}")
    if set(layers) != wanted:
        extra, absent = sorted(set(layers) - wanted), sorted(wanted - set(layers))
        raise ValueError(f"{path} adapts other layers than the model: {len(absent)} only in the file "
                         f"{absent[:2]}, {len(extra)} only in the model {extra[:2]}; set "
                         f"task.model.target_modules to the file's target_modules")


@torch.no_grad()
def _copy_weights(layers: dict[str, methods.AdapterLayer], tensors: dict[tuple[str, str], torch.Tensor],
                  path: Path) -> None:
    params = {(ln, pn): p for ln, layer in layers.items() for pn, p in layer.adapter_parameters()}
    missing = sorted(f"{m}.{p}" for m, p in set(params) - set(tensors))
    if missing:
        raise ValueError(f"{path / PEFT_WEIGHTS} lacks {len(missing)} tensors the model's layers need, "
                         f"e.g. {missing[:2]} (a different r, factor or decompose_both?)")
    for key, p in params.items():
        if tensors[key].shape != p.shape:
            raise ValueError(f"{path / PEFT_WEIGHTS}: {key[0]}.{key[1]} "
                             f"has shape {tuple(tensors[key].shape)}, "
                             f"the base model's layer needs {tuple(p.shape)}; is it for another base model?")
        p.copy_(tensors[key])


def _check_bases(layers: dict[str, methods.AdapterLayer], bases: dict[str, list[torch.Tensor]],
                 hp: dict[str, Any], path: Path) -> None:
    """Random bases saved in the file (PEFT's save_projection=True) must be the ones the seed regenerates."""
    shared = getattr(next(iter(layers.values())), "bases", None)
    for name, copies in bases.items():
        ours = getattr(shared, name, None)
        if ours is None or any(t.shape != ours.shape or not torch.equal(ours.cpu(), t.to(ours.dtype))
                               for t in copies):
            raise ValueError(f"{path}: the saved {name} differs from the one seed={hp.get('seed')} "
                             f"regenerates; "
                             f"rankbench rebuilds random bases from the seed and cannot use other ones")


@torch.no_grad()
def _load_head(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ValueError(f"{path}: head tensors {unknown[:3]} are not parameters of this model")
    for name, tensor in tensors.items():
        if tensor.shape != params[name].shape:
            raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, "
                             f"the model's {tuple(params[name].shape)}")
        params[name].copy_(tensor)
