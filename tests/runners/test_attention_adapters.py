"""task=clip task.attention_adapters=counted_untrained: the official CLIP code's effective setting (its
attention adapters never train, tests/methods/test_official_code.py) through the real runner."""
from __future__ import annotations

import pytest
from rbtest import compose_config
from safetensors.torch import load_file

from runners.train import run

ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")   # conf/task/clip.yaml attention_targets


def _run(mode: str, tiny_overrides: list[str], tmp_path) -> tuple[dict, dict]:
    out = tmp_path / mode
    overrides = [o for o in tiny_overrides if not o.startswith("out_dir=")]
    record = run(compose_config(["method=lora", "task=clip", "dataset=digits", f"out_dir={out}",
                                 f"task.attention_adapters={mode}", *overrides]))
    return record, load_file(out / "adapter" / "adapter_model.safetensors")


def _is_attention(key: str) -> bool:
    return any(f".{name}." in key for name in ATTENTION)


@pytest.mark.slow
def test_counted_untrained_attention_adapters_keep_their_init_and_the_count(tiny_overrides, tmp_path):
    trained, trained_w = _run("trained", tiny_overrides, tmp_path)
    idle, idle_w = _run("counted_untrained", tiny_overrides, tmp_path)
    assert idle["params"]["trainable"] == trained["params"]["trainable"] > 0
    assert set(idle_w) == set(trained_w) and any(_is_attention(k) for k in idle_w)
    # LoRA's B starts at 0 (PEFT init): untouched in the idle attention adapters, moved everywhere else
    attn_b = [k for k in idle_w if _is_attention(k) and k.endswith("lora_B")]
    mlp_b = [k for k in idle_w if not _is_attention(k) and k.endswith("lora_B")]
    assert attn_b and mlp_b
    assert all(not idle_w[k].any() for k in attn_b)
    assert all(idle_w[k].any() for k in mlp_b) and all(trained_w[k].any() for k in attn_b)


def test_unknown_attention_mode_is_one_clear_error(tiny_overrides):
    from runners.train import RunFailed

    with pytest.raises((RunFailed, ValueError), match=r"task\.attention_adapters='some' is not valid"):
        run(compose_config(["method=lora", "task=clip", "task.attention_adapters=some", *tiny_overrides]))
