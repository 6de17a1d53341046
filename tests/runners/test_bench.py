"""Smoke test of the speed/memory benchmark at tiny sizes (the benchmark itself is not a unit test)."""
from __future__ import annotations

import json

import pytest
import torch

from runners import bench

TINY = ["--model", "vit-stack", "--blocks", "1", "--batch", "2", "--tokens", "8", "--repeats", "2",
        "--steps", "1", "--warmup", "1", "--budget", "lora8"]


def test_bench_prints_table_with_ratios_and_merged_check(tmp_path, capsys):
    pytest.importorskip("peft")
    out = tmp_path / "bench.json"
    results = bench.main([*TINY, "--methods", "lora", "loha", "--no-peak-memory", "--json", str(out),
                          "--profile", "ours:loha"])
    printed = capsys.readouterr().out
    assert "| floor |" in printed and "| ours:loha |" in printed and "| peft:loha |" in printed
    assert "profile of ours:loha" in printed and "aten::" in printed
    assert "merged inference" in printed
    (res,) = results
    rows = {r["config"]: r for r in res["rows"]}
    assert set(rows) == {"floor", "ours:lora", "peft:lora", "ours:loha", "peft:loha"}
    assert rows["ours:loha"]["trainable"] == rows["peft:loha"]["trainable"] == rows["ours:lora"]["trainable"]
    assert rows["ours:lora"]["x_our_lora"] == 1.0 and rows["floor"]["x_floor"] == 1.0
    assert all(len(r["rep_medians_s"]) == 2 and r["saved_bytes"] > 0 for r in rows.values())
    assert all(m["max_rel_diff"] < 1e-4 and m["adapter_effect"] > 0 for m in res["merged"])
    assert json.loads(out.read_text())[0]["budget"] == "lora8"
    # LoRA-8 on the block's q, k, v, o (768 x 768), fc1 and fc2 (768 x 3072), 16 tokens: factored,
    # 3 passes of r (in + out) per token against 2 passes of in x out for the frozen linears
    shapes = [(768, 768)] * 4 + [(768, 3072), (3072, 768)]
    expected = sum(3 * 8 * (i + o) for i, o in shapes) / sum(2 * i * o for i, o in shapes)
    assert rows["ours:lora"]["adapter_macs"] == pytest.approx(expected)
    assert rows["floor"]["adapter_macs"] == 0.0 and rows["peft:lora"]["adapter_macs"] is None


def test_memory_child_reports_peak_in_fresh_process():
    args = bench.parse_args([*TINY, "--methods", "lora"])
    args.current_model = "vit-stack"
    peak = bench.peak_memory_child(args, bench.Config("ours:lora", "lora", {"r": 8}))
    assert isinstance(peak, int) and peak >= 0


def test_missing_backbone_is_skipped_with_message(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(bench, "TINY_CLIP", tmp_path / "absent")
    assert bench.build_workload("tiny-clip", 2, 4, 1, torch.device("cpu")) is None
    assert "skipping tiny-clip" in caplog.text


def test_bench_bf16_autocast_runs_ours_and_peft(capsys):
    """`--bf16` times the GPU runs' setting (forward under autocast, backward outside) for both sides."""
    pytest.importorskip("peft")
    (res,) = bench.main([*TINY, "--methods", "randlora", "--bf16", "--no-peak-memory", "--no-merged-check"])
    assert "bf16 autocast" in res["device"] and "bf16 autocast" in capsys.readouterr().out
    rows = {r["config"]: r for r in res["rows"]}
    assert rows["ours:randlora"]["trainable"] == rows["peft:randlora"]["trainable"] > 0
    assert all(r["median_s"] > 0 and r["saved_bytes"] > 0 for r in rows.values())
