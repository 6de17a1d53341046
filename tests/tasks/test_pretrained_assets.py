"""The committed tiny CLIP is really pretrained: it loads offline like a hub model and knows its concepts."""
from __future__ import annotations

import pytest
import torch
from taskhelpers import compose_task
from transformers import AutoTokenizer, CLIPModel

import tasks
from tasks.models import ASSETS_DIR, resolve_model_path

CLIP_DIR = ASSETS_DIR / "tiny-clip"


def test_asset_is_small_safetensors_and_loads_offline() -> None:
    files = {p.name: p.stat().st_size for p in CLIP_DIR.iterdir()}
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
    assert sum(files.values()) < 8e6
    tok = AutoTokenizer.from_pretrained(CLIP_DIR)
    ids = tok(["a photo of a red circle.", "a photo of a zebra"], padding=True)["input_ids"]
    assert tok.unk_token_id not in ids[0] and tok.unk_token_id in ids[1]
    assert resolve_model_path("tiny-clip") == str(CLIP_DIR)


@pytest.fixture(scope="module")
def zero_shot() -> dict[str, dict[str, float]]:
    """Zero-shot accuracy of the committed weights and of the same architecture randomly initialised."""
    task = tasks.build(compose_task("clip", "task.data.test_size=200", "task.data.train_size=8").task)
    model = task.build_model()
    torch.manual_seed(0)
    random = CLIPModel(model.config)
    return {"pretrained": task.evaluate(model), "random": task.evaluate(random)}


def test_zero_shot_well_above_chance_where_pretrained(zero_shot) -> None:
    acc = zero_shot["pretrained"]
    assert acc["shapes"] > 0.6 and acc["colors"] > 0.8  # chance: 1/8
    assert max(zero_shot["random"]["shapes"], zero_shot["random"]["colors"]) < 0.3


def test_zero_shot_near_chance_on_new_concepts(zero_shot) -> None:
    acc = zero_shot["pretrained"]
    assert acc["digits"] < 0.3  # chance 0.1: handwriting was never in the pretraining data
    assert acc["textures"] < 0.45  # chance 1/6
