"""Slow checks: the pretraining script reproduces bit-identical weights; adaptation beats zero-shot."""
from __future__ import annotations

import pytest
import torch
from bench_tasks import run
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

from runners import pretrain


@pytest.mark.slow
def test_pretrain_is_deterministic_and_loadable(tmp_path) -> None:
    args = ["--steps", "3", "--pool-size", "64", "--batch-size", "16"]
    for run_dir in ("a", "b"):
        pretrain.main([*args, "--out", str(tmp_path / run_dir)])
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    CLIPModel.from_pretrained(tmp_path / "a")
    AutoTokenizer.from_pretrained(tmp_path / "a")
    assert AutoImageProcessor.from_pretrained(tmp_path / "a").crop_size["height"] == 32


@pytest.mark.slow
def test_short_lora_run_beats_zero_shot_on_clip() -> None:
    """60 LoRA steps on textures (zero-shot near chance) with the task's configured lr."""
    res = run("clip", "lora", steps=60, batch_size=64, lr=None, r=8,
              overrides=["dataset=textures", "task.data.train_size=1000", "task.data.test_size=300"])
    assert res["before"]["textures"] < 0.35
    assert res["after"]["textures"] > res["before"]["textures"] + 0.2
