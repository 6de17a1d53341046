"""size=base of task=clip / task=vision: the real configs, run on local stand-ins of the hub models and
datasets (the code path is the one a GPU cluster runs; only paths are overridden)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from paperstandins import clip_model, dinov2_model, image_dataset
from taskhelpers import compose_task

import tasks
from runners.train import run
from tasks.common import ModelNotFoundError

PAPER22 = ["cars", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "sun397", "svhn", "cifar10", "cifar100",
           "imagenet", "stl10", "food101", "caltech101", "caltech256", "fgvc_aircraft", "flowers102",
           "oxford_pets", "cub200", "pascal_voc", "country211", "ucf101"]


@pytest.fixture(scope="module")
def standins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Local copies shaped like the hub: cars (image/label, ClassLabel names with underscores),
    cifar100 (img/fine_label), country211 (webdataset webp/cls + classnames.txt), caltech101 (one split)."""
    root = tmp_path_factory.mktemp("paper_images")
    out = {"clip": clip_model(root / "clip"), "dinov2": dinov2_model(root / "dinov2")}
    out["cars"] = image_dataset(root / "cars", ["red_sedan", "blue_coupe", "green_truck"], {"train": 18, "test": 9})
    out["cifar100"] = image_dataset(root / "cifar100", ["apple", "pear", "plum", "fig"], {"train": 16, "test": 8},
                                    image_column="img", label_column="fine_label", mode="L")
    out["country211"] = image_dataset(root / "country211", ["x", "y"], {"train": 8, "test": 6}, image_column="webp",
                                      label_column="cls", class_label=False)
    (out["country211"] / "classnames.txt").write_text("France\nJapan\n")
    out["caltech101"] = image_dataset(root / "caltech101", ["kiwi", "fig"], {"train": 20})
    return out


def _overrides(standins: dict[str, Path], tmp_path: Path, names: list[str]) -> list[str]:
    return [f"task.data.sources.{n}.path={standins[n]}" for n in names] + [
        f"task.data.datasets=[{','.join(names)}]", f"task.data.cache_dir={tmp_path / 'cache'}",
        "trainer.batch_size=8", "trainer.eval_batch_size=8", "device=cpu"]


def test_base_config_names_the_real_model_and_the_22_dataset_suite() -> None:
    for size, model in (("base", "openai/clip-vit-base-patch32"), ("large", "openai/clip-vit-large-patch14")):
        cfg = compose_task("clip", f"size={size}", "method=lora")
        assert cfg.task.model.path == model and list(cfg.task.data.datasets) == PAPER22
        assert set(cfg.task.data.sources) == set(PAPER22)
        assert cfg.trainer.batch_size * cfg.trainer.grad_accum == 128 and cfg.trainer.weight_decay == 0.1
        assert cfg.trainer.lr == 1e-3 and cfg.trainer.method_lr.full == 1e-5 and cfg.trainer.bf16
        assert cfg.task.data.sources.cars.epochs == 35 and cfg.task.data.sources.dtd.epochs == 76
    vision = compose_task("vision", "size=base")
    assert vision.task.model.path == "facebook/dinov2-base"
    assert list(vision.task.data.datasets) == [d for d in PAPER22 if d != "imagenet"]


def test_clip_base_runs_on_local_standins(standins, tiny_overrides, tmp_path) -> None:
    names = ["cars", "cifar100", "country211", "caltech101"]
    cfg = compose_task("clip", "size=base", "method=lora", f"task.model.path={standins['clip']}",
                       *_overrides(standins, tmp_path, names), *tiny_overrides)
    task = tasks.build(cfg.task)
    assert task.suite["cars"].classes == ["red sedan", "blue coupe", "green truck"]
    assert task.suite["country211"].classes == ["France", "Japan"]
    assert (len(task.suite["caltech101"].train), len(task.suite["caltech101"].test)) == (16, 4)
    x = task.data["cifar100"].train_x[torch.tensor([0, 3])]  # grayscale, odd sizes -> processor
    assert x.shape == (2, 3, 32, 32)
    assert task.planned_steps(8) == 35 * 3 + 6 * 2 + 15 * 1 + 10 * 2  # epochs x ceil(n / batch) per dataset
    record = run(cfg)
    assert record["run"]["status"] == "success" and record["run"]["size"] == "base"
    assert set(record["metrics"]["per_dataset"]) == set(names)
    saved = json.loads((Path(cfg.out_dir) / "results.json").read_text())
    assert saved["run"]["config"]["task"]["model"]["path"] == str(standins["clip"])


def test_k_shot_regime_is_deterministic_per_seed_and_cached(standins, tmp_path) -> None:
    def suite(seed: int, *extra: str) -> dict:
        cfg = compose_task("clip", "size=base", f"seed={seed}", "task.data.shots=2",
                           *_overrides(standins, tmp_path, ["cars"]), *extra)
        return tasks.build(cfg.task).suite["cars"].train

    a, b, c = suite(0), suite(0), suite(1)
    assert len(a) == 6 and sorted(a["label"]) == [0, 0, 1, 1, 2, 2]  # 2 shots x 3 classes
    assert list(a["label"]) == list(b["label"]) and a["image"][0].tobytes() == b["image"][0].tobytes()
    assert [im.tobytes() for im in a["image"]] != [im.tobytes() for im in c["image"]], "seed changes the draw"
    cached = sorted((tmp_path / "cache").glob("cars-*-2shot-s0.json"))
    assert len(cached) == 1 and len(json.loads(cached[0].read_text())["indices"]) == 6
    half = suite(0, "task.data.shots=null", "task.data.fraction=0.5")
    assert len(half) == 9  # stratified: floor(6 / 2) of each class
    cfg = compose_task("clip", "size=base", "task.data.shots=2", *_overrides(standins, tmp_path, ["cars"]))
    task = tasks.build(cfg.task)
    assert task.planned_steps(8) == 10 * 10  # 10 epochs x >= 10 iterations (paper rule)
    assert task.regime == "2shot"


def test_vision_base_runs_dinov2_standin_with_memory_savers(standins, tiny_overrides, tmp_path) -> None:
    cfg = compose_task("vision", "size=base", "method=loha", f"task.model.path={standins['dinov2']}",
                       "task.model.gradient_checkpointing=true", *_overrides(standins, tmp_path, ["cars", "cifar100"]),
                       *tiny_overrides)
    task = tasks.build(cfg.task)
    model = task.build_model()
    assert model.backbone.is_activation_checkpointing
    assert task.memory_savers == {"gradient_checkpointing": True, "base_dtype": "float32"}
    record = run(cfg)
    assert record["run"]["status"] == "success" and set(record["metrics"]["per_dataset"]) == {"cars", "cifar100"}


def test_bf16_base_weights_load_in_bf16(standins, tmp_path) -> None:
    cfg = compose_task("vision", "size=base", f"task.model.path={standins['dinov2']}", "task.model.dtype=bfloat16",
                       *_overrides(standins, tmp_path, ["cars"]))
    task = tasks.build(cfg.task)
    model = task.build_model()
    assert model.backbone.embeddings.patch_embeddings.projection.weight.dtype == torch.bfloat16
    assert model.heads["cars"].weight.dtype == torch.float32, "the trained head stays float32"
    batch = next(task.train_batches(4, torch.Generator().manual_seed(0)))
    assert torch.isfinite(task.loss(model, batch))
    assert task.memory_savers["base_dtype"] == "bfloat16"


@pytest.mark.parametrize("task_name", ["clip", "vision"])
def test_unreachable_hub_model_and_dataset_are_one_clear_error(task_name: str, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    task = tasks.build(compose_task(task_name, "size=base", "dataset=cars").task)
    with pytest.raises(ModelNotFoundError) as e:
        task.build_model()
    msg = str(e.value)
    assert cfg_model(task) in msg and "could not be reached" in msg and "task.model.path" in msg
    with pytest.raises(FileNotFoundError) as e:
        _ = task.suite
    msg = str(e.value)
    assert "tanganke/stanford_cars" in msg and "could not be reached" in msg
    assert re.search(r"task\.data\.sources\.cars\.path", msg) and "save_to_disk" in msg
    task = tasks.build(compose_task(task_name, "size=base", "dataset=ucf101").task)
    with pytest.raises(FileNotFoundError, match=r"ucf101.*task\.data\.sources\.ucf101\.path"):
        _ = task.suite


def cfg_model(task: tasks.Task) -> str:
    return str(task.cfg.model.path)


def test_vision_clip_encoder_under_a_frozen_prompt_classifier(standins, tiny_overrides, tmp_path) -> None:
    """task/vision=clip_base: CLIP image tower + zero-shot classifier that no method trains."""
    cfg = compose_task("vision", "size=base", "task/vision=clip_base", "method=full",
                       f"task.model.path={standins['clip']}", *_overrides(standins, tmp_path, ["cars"]),
                       *tiny_overrides)
    task = tasks.build(cfg.task)
    model = task.build_model()
    assert not any(n.startswith("heads.") for n, _ in model.named_parameters()), "classifier is buffers only"
    assert model.heads["cars"].weight.shape == (3, 32)
    assert not any("text_model" in n for n, _ in model.named_parameters()), "the text tower is dropped"
    before = model.heads["cars"].weight.clone()
    record = run(cfg)
    assert record["run"]["status"] == "success" and record["params"]["head_trainable"] == 0
    assert torch.equal(task.build_model().heads["cars"].weight, before), "prompt classifier is deterministic"
