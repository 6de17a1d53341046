"""runners.export: a run's adapter in PEFT's format loads with `PeftModel.from_pretrained` and gives our
outputs; the merged model loads with plain `from_pretrained`; PEFT folders import back; bad input is one line.

PEFT is the reference here (a dev dependency), as in tests/methods/test_method_parity.py.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from rbtest import ROOT, compose_config
from safetensors.torch import load_file, save_file

import methods
from runners.engine import peft_files
from runners.engine.adapt import adapt
from runners.train import run

peft = pytest.importorskip("peft")

EXPORTED = peft_files.exportable()   # every registered adapter: each class carries its PEFT spec
RANDOM_BASES = [m for m in EXPORTED if methods.get_method(m).peft.random]   # RandLoRA, VeRA, ...
TOL = 1e-5   # relative difference, fp32


def tiny_run(out: Path, method: str, task: str = "clip", extra: tuple[str, ...] | list[str] = ()) -> Path:
    """Three training steps of `method` on one tiny dataset (as tests/conftest.py tiny_overrides)."""
    run(compose_config([f"method={method}", f"task={task}", "dataset=shapes", f"out_dir={out}", "logger=none",
                        "trainer.max_steps=3", "trainer.log_every=3", "trainer.timing_warmup=1",
                        "trainer.checkpoint_every=0", "trainer.batch_size=8", "task.data.train_size=16",
                        "task.data.test_size=8", "threads=1", *extra]))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {m: tiny_run(root / m, m) for m in EXPORTED}


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def clip_inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model.config._name_or_path)
    size = model.config.vision_config.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    return {"pixel_values": pixels,
            **tok(["a photo of a circle", "a red square"], padding=True, return_tensors="pt")}


@torch.no_grad()
def clip_out(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    out = model(**inputs)
    return torch.cat([out.image_embeds.flatten(), out.text_embeds.flatten(), out.logits_per_image.flatten()])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def ours(run_dir: Path) -> torch.nn.Module:
    model = peft_files.build_base(record(run_dir))
    methods.load_adapter(model, run_dir / "adapter")
    return model


def test_every_registered_method_has_a_peft_format():
    assert set(EXPORTED) == set(methods.available())
    for method in EXPORTED:
        assert hasattr(peft, methods.get_method(method).peft.config_class), method


@pytest.mark.parametrize("method", EXPORTED)
def test_a_config_file_without_optional_fields_reads_as_peft_reads_it(method, tmp_path):
    """PEFT fills a field absent from adapter_config.json with its config class's default; so does the
    import, for every method: the hp read from a file of just the type (and the fields the method fixes)
    equal those read from the whole file PEFT writes for that config."""
    fmt = methods.get_method(method).peft
    full = tmp_path / "full"
    getattr(peft, fmt.config_class)(target_modules=["fc1"], **fmt.refuse).save_pretrained(full)
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": fmt.peft_type, **fmt.refuse, "target_modules": ["fc1"]}))
    _, bare, _ = peft_files.read_peft_config(tmp_path / "bare")
    assert bare == peft_files.read_peft_config(full)[1]


@pytest.mark.parametrize("method", EXPORTED)
def test_round_trip_through_peft(method, runs, tmp_path):
    run_dir = runs[method]
    out = peft_files.export_peft(run_dir, tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    fields = {f.name for f in dataclasses.fields(peft.PeftConfig.from_pretrained(out))}
    assert set(config) <= fields, f"not {config['peft_type']} fields: {set(config) - fields}"
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert sum(t.numel() for t in tensors.values()) == record(run_dir)["params"]["trainable"]  # no bases

    reference = ours(run_dir)
    inputs = clip_inputs(reference)
    want = clip_out(reference, inputs)
    # the adapter acts, well beyond the round-trip tolerance (VeRA's zero-initialised lambda_b moves least)
    assert rel(clip_out(peft_files.build_base(record(run_dir)), inputs), want) > 10 * TOL
    theirs = peft.PeftModel.from_pretrained(peft_files.build_base(record(run_dir)), out)
    assert rel(clip_out(theirs, inputs), want) < TOL
    back = peft_files.build_base(record(run_dir))
    assert sorted(peft_files.import_peft_adapter(back, out)) == sorted(methods.adapter_layers(reference))
    assert rel(clip_out(back, inputs), want) < TOL

    for name in methods.get_method(method).peft.random:  # regenerated from the seed, bit-identical to PEFT's
        bases = next(iter(methods.adapter_layers(reference).values())).bases
        layer = theirs.base_model.model.get_submodule(next(iter(methods.adapter_layers(reference))))
        assert torch.equal(getattr(layer, name)["default"], getattr(bases, name)), name


@pytest.mark.parametrize("method", RANDOM_BASES)
def test_peft_default_export_with_saved_bases_imports(method, runs, tmp_path):
    """PEFT's own save (save_projection=True: bases in the file) imports; the bases are checked."""
    out = peft_files.export_peft(runs[method], tmp_path / "ours")
    config = peft.PeftConfig.from_pretrained(out)
    config.save_projection = True
    theirs = peft.get_peft_model(peft_files.build_base(record(runs[method])), config)
    random = methods.get_method(method).peft.random   # the seed's bases, in PEFT's checkpoint keys
    bases = {f"base_model.{name}": getattr(theirs.base_model, name)["default"] for name in random}
    peft.set_peft_model_state_dict(theirs, {**load_file(str(out / "adapter_model.safetensors")), **bases})
    theirs.save_pretrained(tmp_path / "theirs")
    assert (tmp_path / "theirs/adapter_model.safetensors").stat().st_size > 2 * (
        out / "adapter_model.safetensors").stat().st_size
    back, reference = peft_files.build_base(record(runs[method])), ours(runs[method])
    peft_files.import_peft_adapter(back, tmp_path / "theirs")
    inputs = clip_inputs(back)
    assert rel(clip_out(back, inputs), clip_out(reference, inputs)) < TOL

    saved = load_file(str(tmp_path / "theirs/adapter_model.safetensors"))
    basis = methods.get_method(method).peft.random[0]
    saved[f"base_model.{basis}"] = -saved[f"base_model.{basis}"]
    save_file(saved, str(tmp_path / "theirs/adapter_model.safetensors"))
    with pytest.raises(ValueError, match=rf"the saved {basis} differs from the one seed=0 regenerates"):
        peft_files.import_peft_adapter(peft_files.build_base(record(runs[method])), tmp_path / "theirs")


@pytest.mark.parametrize("method", EXPORTED)
def test_merged_model_loads_with_plain_from_pretrained(method, runs, tmp_path):
    from transformers import CLIPModel

    out = peft_files.export_merged(runs[method], tmp_path / "merged")
    assert not (out / "adapter_config.json").exists()  # else transformers would try to load PEFT
    model, info = CLIPModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # every key is a plain CLIP weight: no adapter tensors left
    reference = ours(runs[method])
    inputs = clip_inputs(reference)
    assert rel(clip_out(model, inputs), clip_out(reference, inputs)) < TOL


def test_headed_task_exports_backbone_adapter_and_head(tmp_path):
    """vision: the adapter loads on the Hugging Face backbone (no `backbone.` prefix); the head goes
    beside it in head.safetensors and comes back on import."""
    from transformers import CLIPVisionModel

    run_dir = tiny_run(tmp_path / "run", "lora", task="vision")
    reference = ours(run_dir)
    with torch.no_grad():
        reference.heads["shapes"].weight.normal_(generator=torch.Generator().manual_seed(1))
    assert peft_files.save_head(reference, ["heads"], run_dir) == run_dir / "head.safetensors"
    out = peft_files.export_peft(run_dir, tmp_path / "peft")
    size = reference.backbone.config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    reference.eval()
    with torch.no_grad():
        want = reference("shapes", pixel_values=pixels)
        head = load_file(str(out / "head.safetensors"))
        base = peft.PeftModel.from_pretrained(
            CLIPVisionModel.from_pretrained(reference.backbone.config._name_or_path), out).eval()
        got = torch.nn.functional.linear(base(pixel_values=pixels).pooler_output, head["heads.shapes.weight"],
                                         head["heads.shapes.bias"])
        assert rel(got, want) < TOL
        back = peft_files.build_base(record(run_dir))
        peft_files.import_peft_adapter(back, out)
        assert rel(back.eval()("shapes", pixel_values=pixels), want) < TOL
        merged = peft_files.export_merged(run_dir, tmp_path / "merged")
        plain = CLIPVisionModel.from_pretrained(merged).eval()
        got = torch.nn.functional.linear(plain(pixel_values=pixels).pooler_output,
                                         head["heads.shapes.weight"], head["heads.shapes.bias"])
        assert rel(got, want) < TOL


def test_runner_route_init_adapter(runs, tmp_path):
    """What runners.train does with +init_adapter: adapt() injects from the method config, then import;
    a config that does not match the file says which overrides do."""
    rec = record(runs["lokr"])
    cfg = OmegaConf.create(rec["run"]["config"])
    out = peft_files.export_peft(runs["lokr"], tmp_path / "peft")
    model = peft_files.build_base(rec)
    adapt(model, cfg.method, cfg.task.model.target_modules, [], None)
    peft_files.import_peft_adapter(model, out)
    inputs = clip_inputs(model)
    assert rel(clip_out(model, inputs), clip_out(ours(runs["lokr"]), inputs)) < TOL

    other = peft_files.build_base(rec)
    adapt(other, OmegaConf.merge(cfg.method, {"r": 2}), cfg.task.model.target_modules, [], None)
    with pytest.raises(ValueError, match=r"run with method.r=8"):
        peft_files.import_peft_adapter(other, out)
    other = peft_files.build_base(rec)
    adapt(other, OmegaConf.create({"name": "lora", "r": 8}), cfg.task.model.target_modules, [], None)
    with pytest.raises(ValueError,
                       match=r"is a lokr adapter but the model has lora layers: run with method=lokr"):
        peft_files.import_peft_adapter(other, out)


def test_bad_peft_folders_fail_with_one_line(runs, tmp_path):
    out = peft_files.export_peft(runs["lora"], tmp_path / "peft")
    base = peft_files.build_base(record(runs["lora"]))

    def broken(name: str, config: dict | None = None, tensors: dict | None = None) -> Path:
        bad = tmp_path / name
        shutil.copytree(out, bad)
        cfg = json.loads((bad / "adapter_config.json").read_text())
        (bad / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
        if tensors is not None:
            save_file(tensors, str(bad / "adapter_model.safetensors"))
        return bad

    weights = load_file(str(out / "adapter_model.safetensors"))
    key = next(k for k in weights if k.endswith("lora_A.weight"))
    cases = {
        broken("rslora", {"use_rslora": True}):
            r"LORA settings rankbench's lora cannot evaluate: \{'use_rslora': True\}",
        # a LORA file with use_dora is DoRA's (conf/method/dora.yaml), which needs the magnitudes too
        broken("dora", {"use_dora": True}): r"lacks 48 tensors .*dora_lora_magnitude_vector_weight",
        broken("vblora", {"peft_type": "VBLORA"}):
            r"PEFT type 'VBLORA' is not supported; valid: .*IA3, .*LORA",
        broken("pattern", {"rank_pattern": {"fc1": 4}}): r"has shape .*, the",  # fc1 layers built at r=4
        broken("shape", tensors={**weights, key: weights[key][:, :-1].contiguous()}):
            r"has shape .*, the base",
        broken("module", tensors={k.replace("text_model", "txt"): v for k, v in weights.items()}):
            r"targets modules this base model does not have",
        tmp_path: r"is not a PEFT adapter folder",
    }
    for folder, message in cases.items():
        with pytest.raises(ValueError, match=message) as err:
            peft_files.import_peft_adapter(peft_files.build_base(record(runs["lora"])), folder)
        assert "\n" not in str(err.value)
    assert not methods.adapter_layers(base)


#: a budget between two global ranks on the tiny CLIP; "lora3" unless named (LoRA reaches lora3 with one r)
PER_LAYER_BUDGET = {"lora": 50176, "peft_lora": 50176}


@pytest.mark.parametrize("method", [m for m in EXPORTED if methods.get_method(m).peft.patterns])
def test_per_layer_ranks_round_trip_through_peft(method, tmp_path):
    """A budget between two global ranks gives some layers their own r (and, scaling kept, alpha): the
    export writes them as PEFT's rank_pattern / alpha_pattern, PeftModel builds each layer at its own r
    and gives our outputs, and the folder imports back with the same per-layer ranks."""
    run_dir = tiny_run(tmp_path / "run", method, extra=[f"budget={PER_LAYER_BUDGET.get(method, 'lora3')}"])
    hp = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["hp"]
    assert hp.get("rank_pattern"), hp  # the budget needs per-layer ranks (and alphas, where alpha / r scales)
    assert bool(hp.get("alpha_pattern")) == ("alpha" in methods.get_method(method).hp_spec), hp
    out = peft_files.export_peft(run_dir, tmp_path / "peft")
    reference = ours(run_dir)
    inputs = clip_inputs(reference)
    want = clip_out(reference, inputs)
    theirs = peft.PeftModel.from_pretrained(peft_files.build_base(record(run_dir)), out)
    assert rel(clip_out(theirs, inputs), want) < TOL
    own = {n: layer.hp["r"] for n, layer in methods.adapter_layers(reference).items()}
    assert len(set(own.values())) > 1
    for name, layer in methods.adapter_layers(reference).items():  # PEFT built every layer at its own r
        peft_layer = theirs.base_model.model.get_submodule(name)
        assert sum(p.numel() for n, p in peft_layer.named_parameters() if ".default" in n) == sum(
            p.numel() for _, p in layer.adapter_parameters()), name
    back = peft_files.build_base(record(run_dir))
    peft_files.import_peft_adapter(back, out)
    assert {n: layer.hp["r"] for n, layer in methods.adapter_layers(back).items()} == own
    assert rel(clip_out(back, inputs), want) < TOL


def test_per_layer_ranks_without_a_peft_pattern_field_are_refused(tmp_path):
    """PEFT's RandLoraConfig has no rank_pattern: a one-r export would not load, so it refuses in one line."""
    run_dir = tiny_run(tmp_path / "run", "randlora", extra=["budget=lora3"])
    with pytest.raises(ValueError, match=r"own r or alpha \(alpha_pattern, rank_pattern: "
                                         r".*RandLoraConfig has "
                                         r"no rank_pattern") as err:
        peft_files.export_peft(run_dir, tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_bad_run_directories_fail_with_one_line(runs, tmp_path):
    rec = record(runs["lora"])

    def fake(name: str, **run_fields) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "results.json").write_text(json.dumps({**rec, "run": {**rec["run"], **run_fields}}))
        return d

    cases = {
        tmp_path / "nothing": r"not a rankbench run directory: no readable results.json",
        fake("full", method="full"):
            r"method=full trains no adapter, so there is nothing to export; exportable",
        fake("none", method="none"): r"method=none trains no adapter",
        fake("noadapter"): r"has no trained adapter \(no adapter/adapter_config.json; run status success\)",
        fake("suite", parts={"shapes": "shapes/results.json", "colors": "colors/results.json"}):
            r"is a suite run with one adapter per dataset; export one of: .*/suite/shapes, .*/suite/colors",
    }
    for run_dir, message in cases.items():
        for merged in (False, True):
            with pytest.raises(ValueError, match=message):
                (peft_files.export_merged if merged else peft_files.export_peft)(run_dir, tmp_path / "out")
    proc = subprocess.run([sys.executable, "-m", "runners.export", str(tmp_path / "full"), "--out",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("export: method=full trains no adapter")
    assert not (tmp_path / "out").exists()
