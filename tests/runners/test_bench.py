"""Smoke test of the speed/memory benchmark at tiny sizes (the benchmark itself is not a unit test)."""
from __future__ import annotations

import json

import pytest
import torch

import methods
from runners import bench

TINY = ["--model", "vit-stack", "--blocks", "1", "--batch", "2", "--tokens", "8", "--repeats", "2",
        "--steps", "1", "--warmup", "1", "--budget", "lora8"]


def test_bench_prints_table_with_ratios_and_merged_check(tmp_path, capsys):
    pytest.importorskip("peft")
    out = tmp_path / "bench.json"
    results = bench.main([*TINY, "--methods", "lora", "loha", "--no-peak-memory", "--json", str(out),
                          "--profile", "ours:loha"])
    printed = capsys.readouterr().out
    assert all(f"| {c} |" in printed for c in ("floor", "full", "ours:loha", "peft:loha"))
    assert "profile of ours:loha" in printed and "aten::" in printed
    assert "merged inference" in printed
    (res,) = results
    rows = {r["config"]: r for r in res["rows"]}
    assert set(rows) == {"floor", "full", "ours:lora", "peft:lora", "ours:loha", "peft:loha"}
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
    # full fine-tuning of the targets: every weight and bias of the block's linears, one more dense GEMM
    assert rows["full"]["trainable"] == sum(i * o + o for i, o in shapes)
    assert rows["full"]["x_full"] == 1.0 and rows["full"]["adapter_macs"] == 0.5
    # every step also timed by the process's CPU time, ratios formed the same way (same steps, other clock)
    assert rows["full"]["x_full_cpu"] == 1.0 and all(len(r["cpu_rep_medians_s"]) == 2 for r in rows.values())
    assert all(0 < r["x_full_cpu"] < 100 for r in rows.values()) and "x_full_cpu" in printed
    assert res["full_rank_floor"] == pytest.approx(1 + 2 * 768 / (3 * 16)) and "full-rank floor" in printed


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


SMALL = ["--model", "vit-stack", "--blocks", "1", "--width", "64", "--batch", "2", "--tokens", "64",
         "--budget", "lora8"]


def test_width_option_builds_a_narrower_stack():
    work = bench.build_workload("vit-stack", 2, 4, 1, torch.device("cpu"), width=64)
    assert work.model.blocks[0].fc1.out_features == 256 and work.model.blocks[0].heads == 1
    assert "64/256 linears" in work.description


def test_saved_bytes_count_the_dw_randlora_keeps_across_micro_batches():
    """Under autocast the kept dW (bf16, for the next micro-batch) is not a saved tensor of the graph;
    the bench still counts it, so keeping dW is never free in the table."""
    args = bench.parse_args([*SMALL, "--bf16"])
    device = torch.device("cpu")
    work = bench.build_workload("vit-stack", 2, 64, 1, device, width=64)
    bench.prepare(work, device, bf16=True)
    (cfg,) = [c for c in bench.make_configs(work, args.budget[0], ["randlora"], False) if c.impl == "ours"]
    trainer = bench.Trainer(work, cfg, device)
    layers = list(methods.adapter_layers(trainer.model).values())
    assert all(layer.keeps_delta(torch.bfloat16) for layer in layers)
    kept = bench.saved_tensor_bytes(trainer)
    for layer in layers:
        layer.keeps_delta = lambda half=None: False
    rebuilt = bench.saved_tensor_bytes(trainer)
    assert kept - rebuilt == sum(2 * layer.in_features * layer.out_features for layer in layers)


def test_bench_randlora_saves_no_more_than_peft_and_runs_full_fine_tuning():
    pytest.importorskip("peft")
    (res,) = bench.main([*SMALL, "--methods", "randlora", "--repeats", "1", "--steps", "1", "--warmup", "0",
                         "--no-peak-memory", "--no-merged-check"])
    rows = {r["config"]: r for r in res["rows"]}
    assert rows["ours:randlora"]["saved_bytes"] <= rows["peft:randlora"]["saved_bytes"]
    assert rows["full"]["median_s"] > 0 and rows["ours:randlora"]["x_full"] > 0


def test_ratios_carry_their_range_over_repetitions():
    """Each ratio is the median of the per-repetition ratios, printed with their min-max."""
    rows = [{"config": "floor", "rep_medians_s": [1.0, 1.0, 1.0], "cpu_rep_medians_s": [1.0] * 3, "flops": 10,
             "ops": 5},
            {"config": "full", "rep_medians_s": [2.0, 2.0, 2.0], "cpu_rep_medians_s": [2.0] * 3, "flops": 15,
             "ops": 8},
            {"config": "ours:lora", "rep_medians_s": [1.0, 1.2, 1.1], "cpu_rep_medians_s": [1.0] * 3,
             "flops": 11, "ops": 10},
            {"config": "ours:loha", "rep_medians_s": [1.1, 1.2, 1.43], "cpu_rep_medians_s": [1.0] * 3,
             "flops": 22, "ops": 15}]
    bench.add_ratios(rows)
    loha = rows[3]
    assert loha["x_our_lora"] == pytest.approx(1.1) and loha["x_our_lora_range"] == pytest.approx([1.0, 1.3])
    assert loha["x_full"] == pytest.approx(0.6) and loha["x_full_range"] == pytest.approx([0.55, 0.715])
    assert ((loha["flops_x_lora"], loha["ops_x_lora"]) == (2.0, 1.5)
            and rows[0]["flops_x_lora"] == pytest.approx(10 / 11))
    assert (bench._spread(loha, "x_our_lora") == "1.10 (1.00-1.30)"
            and bench._spread(rows[2], "x_our_lora") == "1.00")


def test_step_counts_and_randlora_floor_flops():
    """FLOPs and operators per configuration: full fine-tuning adds exactly the weight gradients' products
    to the floor's, and RandLoRA's floor adds one dW build and one projection per target call."""
    device = torch.device("cpu")
    work = bench.build_workload("vit-stack", 2, 8, 1, device, width=64)
    bench.prepare(work, device)
    floor, full = (bench.step_counts(bench.Trainer(work, bench.Config(c, None, {}), device))
                   for c in ("floor", "full"))
    calls = bench.target_calls(work)
    assert full.flops - floor.flops == sum(2 * t * i * o for t, i, o in calls) and full.ops > floor.ops
    assert bench.full_rank_floor_flops(work, full.flops) == full.flops + sum(4 * min(i, o) * i * o
                                                                             for _, i, o in calls)


def test_bench_takes_peft_backed_methods_against_our_lora(caplog):
    """PEFT-backed methods are benched like the native ones (x_our_lora), each against get_peft_model of
    the same config (x_peft); a method without a size knob (IA3) runs at its native count, saying so."""
    pytest.importorskip("peft")
    with caplog.at_level("INFO"):
        (res,) = bench.main([*TINY, "--methods", "lora", "peft_lora", "ia3", "--no-peak-memory",
                             "--no-merged-check"])
    rows = {r["config"]: r for r in res["rows"]}
    assert (rows["ours:peft_lora"]["trainable"] == rows["ours:lora"]["trainable"]
            == rows["peft:peft_lora"]["trainable"])
    assert rows["ours:peft_lora"]["x_our_lora"] > 0 and rows["ours:peft_lora"]["x_peft"] > 0
    assert rows["ours:peft_lora"]["adapter_macs"] is None   # PEFT's forward: no cost model of ours
    assert rows["ours:ia3"]["trainable"] == 5 * 768 + 3072 == rows["peft:ia3"]["trainable"]   # in per layer
    assert "ia3 has no size knob: benched at its native count, not lora8" in caplog.text
