"""runners.gpucheck on CPU: the same code that runs on a GPU machine, at small widths (no CUDA touched)."""
from __future__ import annotations

import json

import pytest
import torch
from rbtest import own
from torch import nn

import methods
from runners import gpucheck


def test_small_check_passes_and_writes_every_configuration(tmp_path, capsys) -> None:
    out = tmp_path / "rows.json"
    code = gpucheck.main(["--device", "cpu", "--shapes", "small", "--models", "llama-1.1b", "--steps", "1",
                          "--methods", "lora", "randlora", "--modes", "fp32", "bf16-base", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert code == 0, capsys.readouterr().err
    assert {(r["mode"], r["method"], r["impl"]) for r in rows} == {
        (m, n, i) for m in ("fp32", "bf16-base") for n in ("lora", "randlora") for i in ("ours", "peft")}
    ours = [r for r in rows if r["impl"] == "ours"]
    assert all(r["step_times_s"] and not r["failures"] for r in rows)
    assert all(r["rank"]["rank"] <= r["hp"]["r"] for r in ours if r["method"] == "lora")
    # the memory plan, traced on meta
    planned = {(r["mode"], r["method"]): r["predicted_peak_bytes"] for r in ours}
    assert all(b > 0 for b in planned.values()) and planned["fp32", "lora"] > planned["bf16-base", "lora"]
    assert "| llama-1.1b | bf16-base | randlora |" in capsys.readouterr().out


def test_a_violated_rank_bound_fails_the_check(monkeypatch) -> None:
    monkeypatch.setattr(gpucheck, "rank_bound", lambda layer: 0)
    code = gpucheck.main(["--device", "cpu", "--shapes", "small", "--models", "clip-vit-b32", "--steps", "1",
                          "--methods", "lora", "--modes", "fp32", "--no-peft"])
    assert code == 1


@pytest.mark.parametrize("method", methods.available())
def test_rank_bound_is_each_registered_method_s_own_and_tight(method) -> None:
    """Random adapter weights reach the bound exactly: a bound too high or too low (or missing) fails."""
    layer = methods.wrap_linear(method, nn.Linear(40, 24), **own(method, [(40, 24)], r=3))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in layer.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    rank = torch.linalg.matrix_rank(layer.delta_weight().detach()).item()
    if type(layer).max_rank_exact:
        assert gpucheck.rank_bound(layer) == rank
    else:  # a bound the method declares as an upper bound only (FourierFT's spectrum)
        assert gpucheck.rank_bound(layer) >= rank


def test_zero_gradients_are_named() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model(torch.ones(1, 3)).sum().backward()
    assert gpucheck.gradient_failures(model, "ours") == []
    model[0].weight.grad.zero_()
    assert gpucheck.gradient_failures(model, "ours") == ["zero or missing gradient: 0.weight"]
    assert gpucheck.gradient_failures(model, "peft") == []


def test_cuda_requested_without_cuda_is_one_line(caplog) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert gpucheck.main(["--device", "cuda"]) == 2
    assert "no CUDA device here" in caplog.text


@pytest.mark.slow
def test_compiled_rows_match_ours_eager(tmp_path, capsys) -> None:
    """`--compile-modes`: ours under torch.compile beside ours eager, losses compared, compile time shown."""
    out = tmp_path / "rows.json"
    code = gpucheck.main(["--device", "cpu", "--shapes", "small", "--models", "llama-1.1b", "--steps", "2",
                          "--methods", "lora", "--modes", "fp32", "--no-peft", "--compile-modes", "fp32",
                          "--out", str(out)])
    rows = {r["impl"]: r for r in json.loads(out.read_text())}
    assert code == 0, capsys.readouterr().err
    assert set(rows) == {"ours", "compiled"}
    assert rows["compiled"]["losses"] == pytest.approx(rows["ours"]["losses"], rel=1e-3)
    assert "(compiled," in capsys.readouterr().out


def test_compiled_losses_that_drift_are_a_failure() -> None:
    eager = gpucheck.Row("m", "fp32", "lora", "ours", {}, 0, losses=[1.0, 0.9])
    drifted = gpucheck.Row("m", "fp32", "lora", "compiled", {}, 0, losses=[1.0, 0.95])
    assert gpucheck.compile_failures(drifted, eager) and not gpucheck.compile_failures(eager, eager)
