"""size=base of task=clip / task=vision: the real configs, run on local stand-ins of the hub models and
datasets (the code path is the one a GPU cluster runs; only paths are overridden)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from paperstandins import clip_model, dinov2_model, hub_facts, hub_standin
from taskhelpers import compose_task

import tasks
from runners.train import run
from tasks.models import ModelNotFoundError

# The paper's 22 datasets without UCF101 (no public copy of its middle frames: task.protocol.deviations)
PAPER21 = ["cars", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "sun397", "svhn", "cifar10", "cifar100",
           "imagenet", "stl10", "food101", "caltech101", "caltech256", "fgvc_aircraft", "flowers102",
           "oxford_pets", "cub200", "pascal_voc", "country211"]


@pytest.fixture(scope="module")
def standins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Local copies shaped as tests/fixtures/hub/clip22.json says the hub copies are (not as the configs
    believe): cars (image/label, one image per class), cifar100 (img/fine_label, the hub's 'cra', grayscale),
    cub200, country211 (webdataset: jpg/cls + classnames.txt), pascal_voc (webp/cls + the raw VOC names)
    and caltech101 (one split)."""
    root = tmp_path_factory.mktemp("paper_images")
    facts = hub_facts("clip22")
    out = {"clip": clip_model(root / "clip"), "dinov2": dinov2_model(root / "dinov2")}
    rows = {"cars": 196, "cifar100": 100, "cub200": 200, "country211": 211, "pascal_voc": 20,
            "caltech101": 202}
    for name, n in rows.items():
        out[name] = hub_standin(root / name, name, facts[name], rows=n,
                                mode="L" if name == "cifar100" else "RGB")
    return out


def _overrides(standins: dict[str, Path], tmp_path: Path, names: list[str]) -> list[str]:
    return [f"task.data.sources.{n}.path={standins[n]}" for n in names] + [
        f"task.data.datasets=[{','.join(names)}]", f"task.data.cache_dir={tmp_path / 'cache'}",
        "trainer.batch_size=8", "trainer.eval_batch_size=64", "device=cpu", "task.data.test_size=24"]


DINO_28 = ["task.model.processor.size.shortest_edge=28", "task.model.processor.crop_size.height=28",
           "task.model.processor.crop_size.width=28"]  # the stand-in DINOv2 is 28 px


def test_base_config_is_the_official_protocol() -> None:
    for size, model in (("base", "openai/clip-vit-base-patch32"), ("large", "openai/clip-vit-large-patch14")):
        cfg = compose_task("clip", f"size={size}", "method=lora")
        assert cfg.task.model.path == model and list(cfg.task.data.datasets) == PAPER21
        assert set(cfg.task.data.sources) == set(PAPER21) | {"ucf101"}
        assert cfg.trainer.batch_size * cfg.trainer.grad_accum == 128 and cfg.trainer.weight_decay == 0.1
        assert cfg.trainer.lr == 1e-3 and cfg.trainer.method_lr.full == 1e-5 and cfg.trainer.bf16
        assert ((cfg.trainer.warmup_steps, cfg.trainer.schedule, cfg.trainer.final_lr_ratio)
                == (0, "cosine", 0.01))
        assert list(cfg.task.model.target_modules) == ["q_proj", "k_proj", "v_proj", "fc1", "fc2"]
        assert cfg.task.objective.prompts.train == "An image of {}"
        assert cfg.task.objective.logit_scale == "raw"
        assert cfg.task.objective.loss == "in_batch" and cfg.task.data.sample_seed == 8539
        assert cfg.task.data.augment.scale == [0.5, 1.0] and cfg.task.data.augment.flip == 0.5
        assert cfg.task.data.sources.cars.epochs == 35 and cfg.task.data.sources.dtd.epochs == 76
        assert cfg.task.data.sources.country211.image_column == "jpg"
        assert cfg.task.data.sources.pascal_voc.image_column == "webp"
        assert all(d["what"] and d["why"] for d in cfg.task.protocol.deviations)
    vision = compose_task("vision", "size=base")
    assert vision.task.model.path == "facebook/dinov2-base"
    assert list(vision.task.data.datasets) == [d for d in PAPER21 if d != "imagenet"]
    assert not vision.task.model.head_bias and vision.task.model.head_init_std == 0.01
    assert list(vision.task.model.target_modules) == ["q_proj", "k_proj", "v_proj", "fc1", "fc2"]


def test_no_default_suite_names_a_source_without_a_path() -> None:
    """A dataset with no verified copy stays out of the default suites: it would stop a run on a GPU node."""
    for task, size in (("clip", "base"), ("clip", "large"), ("vision", "base"), ("vision", "large")):
        cfg = compose_task(task, f"size={size}")
        missing = [d for d in cfg.task.data.datasets if not cfg.task.data.sources[d].path]
        assert missing == [], (task, size, missing)


def test_curated_class_names_follow_each_copys_own_label_order(standins, tmp_path) -> None:
    cfg = compose_task("clip", "size=base", "method=lora", f"task.model.path={standins['clip']}",
                       *_overrides(standins, tmp_path,
                                   ["cars", "cifar100", "cub200", "country211", "pascal_voc"]))
    suite = tasks.build(cfg.task).suite
    assert suite["cars"].classes[:2] == ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]
    hub_cifar = suite["cifar100"].train.features["label"].names
    # the hub typo maps to the official name
    assert suite["cifar100"].classes[hub_cifar.index("cra")] == "crab"
    assert suite["cifar100"].classes[hub_cifar.index("apple")] == "apple"
    assert suite["cifar100"].classes[0] == hub_cifar[0]
    assert suite["cub200"].classes[0] == "Black footed Albatross"
    assert suite["country211"].classes[:2] == ["Andorra", "United Arab Emirates"]
    # the copy's classnames.txt holds the raw VOC names; prompts use the official ones, in the copy's order
    assert (standins["pascal_voc"] / "classnames.txt").read_text().split()[10] == "diningtable"
    assert suite["pascal_voc"].classes[10] == "dining table"
    assert suite["pascal_voc"].classes[-1] == "tv monitor"
    assert len(suite["cub200"].ensemble) == 1 and len(suite["cifar100"].ensemble) == 18  # templates.py lists


def test_clip_base_runs_on_local_standins(standins, tiny_overrides, tmp_path) -> None:
    names = ["cars", "cifar100", "country211", "caltech101"]
    cfg = compose_task("clip", "size=base", "method=lora", f"task.model.path={standins['clip']}",
                       *_overrides(standins, tmp_path, names), *tiny_overrides)
    task = tasks.build(cfg.task)
    assert (len(task.suite["caltech101"].train), len(task.suite["caltech101"].test)) == (64, 32)  # capped
    x = task.data["cifar100"].train_x[torch.tensor([0, 3])]  # grayscale, odd sizes -> augmented crops
    assert x.shape == (2, 3, 32, 32)
    record = run(cfg)
    assert record["run"]["status"] == "success" and record["run"]["size"] == "base"
    assert set(record["metrics"]["per_dataset"]) == set(names)
    assert record["run"]["protocol"]["deviations"] == list(cfg.task.protocol.deviations)
    part = json.loads((Path(cfg.out_dir) / "cars" / "results.json").read_text())
    assert part["run"]["config"]["task"]["model"]["path"] == str(standins["clip"])
    assert part["run"]["dataset"] == "cars" and part["run"]["protocol"]["source"].startswith("RandLoRA")


def test_k_shot_regime_is_deterministic_per_seed_and_cached(standins, tmp_path) -> None:
    def suite(seed: int, *extra: str) -> dict:
        # no validation hold-out: this copy has one image per class, which a 10% hold-out would thin out
        cfg = compose_task("clip", "size=base", f"seed={seed}", "task.data.shots=2",
                           "task.data.val_fraction=0", *_overrides(standins, tmp_path, ["cars"]), *extra)
        return tasks.build(cfg.task).suite["cars"].train

    a, b = suite(0), suite(0)
    suite(1, "task.data.sample_seed=1")
    assert len(a) == 196 and sorted(set(a["label"])) == list(range(196))  # one image per class in this copy
    assert list(a["label"]) == list(b["label"]) and a["image"][0].tobytes() == b["image"][0].tobytes()
    cached = sorted((tmp_path / "cache").glob("cars-*-2shot-s8539.json"))  # the official constant seed
    assert len(cached) == 1 and len(json.loads(cached[0].read_text())["indices"]) == 196
    assert len(sorted((tmp_path / "cache").glob("cars-*-2shot-s1.json"))) == 1, "sample_seed names the draw"
    half = suite(0, "task.data.shots=null", "task.data.fraction=0.5")
    assert len(half) == 196  # stratified: max(1, floor(1 / 2)) of each class
    cfg = compose_task("clip", "size=base", "task.data.shots=2", "task.data.val_fraction=0",
                       *_overrides(standins, tmp_path, ["cars"]))
    task = tasks.build(cfg.task)
    assert task.planned_steps(8) == 10 * 25  # 10 epochs x max(10, ceil(196 / 8)) iterations (paper rule)
    assert task.regime == "2shot"


def test_vision_base_runs_dinov2_standin_with_memory_savers(standins, tiny_overrides, tmp_path) -> None:
    cfg = compose_task("vision", "size=base", "method=loha", f"task.model.path={standins['dinov2']}",
                       "task.model.gradient_checkpointing=true",
                       *_overrides(standins, tmp_path, ["cars", "cifar100"]), *DINO_28, *tiny_overrides)
    task = tasks.build(cfg.task)
    model = task.build_model()
    assert model.backbone.is_activation_checkpointing
    assert model.heads["cars"].bias is None and 0.005 < float(model.heads["cars"].weight.std()) < 0.015
    # CLIP statistics, as official
    assert list(task.processor.image_mean) == [0.48145466, 0.4578275, 0.40821073]
    assert task.memory_savers == {"gradient_checkpointing": True, "base_dtype": "float32"}
    record = run(cfg)
    assert record["run"]["status"] == "success"
    assert set(record["metrics"]["per_dataset"]) == {"cars", "cifar100"}


def test_bf16_base_weights_load_in_bf16(standins, tmp_path) -> None:
    cfg = compose_task("vision", "size=base", f"task.model.path={standins['dinov2']}",
                       "task.model.dtype=bfloat16", *_overrides(standins, tmp_path, ["cars"]), *DINO_28)
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
    task = tasks.build(compose_task(task_name, "size=base", "task.data.datasets=[cars,ucf101]",
                                    "dataset=ucf101").task)
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
    assert model.heads["cars"].weight.shape == (196, 32)
    assert not any("text_model" in n for n, _ in model.named_parameters()), "the text tower is dropped"
    before = model.heads["cars"].weight.clone()
    record = run(cfg)
    assert record["run"]["status"] == "success" and record["params"]["head_trainable"] == 0
    assert torch.equal(task.build_model().heads["cars"].weight, before), "prompt classifier is deterministic"


def test_official_objective_is_an_in_batch_loss_with_the_raw_logit_scale() -> None:
    """task.objective as the official code: one prompt per image, B x B similarities times the raw
    logit_scale parameter, the target of image i the first image of the batch with i's class."""
    import torch.nn.functional as F

    from tasks.clip import class_embeddings, image_features

    cfg = compose_task("clip", "dataset=shapes", "task.data.train_size=32", "task.data.test_size=8",
                       "task.objective.loss=in_batch", "task.objective.logit_scale=raw",
                       "task.objective.prompts.train='An image of {}'")
    task = tasks.build(cfg.task)
    model = task.build_model()
    batch = next(task.train_batches(6, torch.Generator().manual_seed(0)))
    batch["labels"] = torch.tensor([2, 0, 2, 1, 0, 2])
    d = task.data["shapes"]
    with torch.no_grad():
        img = image_features(model, batch["pixel_values"])
        txt = class_embeddings(model, d.prompts, len(d.classes))[batch["labels"]]
        expected = F.cross_entropy(model.logit_scale * img @ txt.T, torch.tensor([0, 1, 0, 3, 1, 0]))
        assert torch.allclose(task.loss(model, batch), expected, atol=1e-6)
    assert (task.tokenizer.decode(d.prompts["input_ids"][0], skip_special_tokens=True)
            .startswith("an image of"))


def test_prompt_ensemble_averages_normalised_template_embeddings() -> None:
    from tasks.clip import class_embeddings, text_features

    cfg = compose_task("clip", "dataset=shapes", "task.data.train_size=8", "task.data.test_size=8")
    task = tasks.build(cfg.task)
    model = task.build_model()
    prompts = task._tokenize(["a photo of a {}.", "a photo of the {}."], task.data["shapes"].classes)
    n = len(task.data["shapes"].classes)
    with torch.no_grad():
        both = class_embeddings(model, prompts, n)
        single = text_features(model, prompts["input_ids"], prompts["attention_mask"]).view(2, n, -1)
    manual = torch.nn.functional.normalize(single.mean(0), dim=-1)
    assert torch.allclose(both, manual, atol=1e-6) and not torch.allclose(both, single[0], atol=1e-3)
