"""Unit tests of the measurement helpers the runner applies identically to every method."""
import itertools
import json

import pytest
import torch
from torch import nn

from runners.engine.measure import PeakMemory, SavedActivations, StepTimer, matrix_ranks, state_bytes
from runners.engine.optimizer import warmup_cosine
from runners.record.results import is_complete, read_results, write_results


def test_warmup_cosine_shape():
    f = warmup_cosine(warmup=4, total=20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(12) == pytest.approx(0.5)
    assert f(20) == pytest.approx(0.0, abs=1e-12)
    values = [f(s) for s in range(4, 21)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_step_timer_excludes_warmup_and_reports_p90():
    timer = StepTimer(torch.device("cpu"), warmup=2)
    timer.times = [10.0, 10.0] + [1.0] * 9 + [2.0]
    s = timer.summary(samples_per_step=8)
    assert s["step_time_s"] == 1.0
    assert s["step_time_p90_s"] == 1.0
    assert s["samples_per_s"] == 8.0


def test_peak_rss_measures_growth_during_training():
    mem = PeakMemory(torch.device("cpu"))
    assert mem.keys == ("peak_rss_bytes",)
    mem.start()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB touched
    assert float(block.sum()) == block.numel()  # touched again right before reading: resident now
    peak = mem.peak()
    del block
    if peak is None:
        pytest.skip("no /proc/self/status on this platform")
    assert peak >= 48 * 2**20


def test_cpu_memory_figures_never_touch_cuda(monkeypatch):
    def no_cuda(*args, **kwargs):
        raise AssertionError("a CPU run called into torch.cuda")

    for name in ("synchronize", "reset_peak_memory_stats", "memory_allocated", "max_memory_allocated",
                 "max_memory_reserved", "device_count", "get_device_name"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    mem = PeakMemory(torch.device("cpu"))
    mem.start()
    assert set(mem.figures()) == {"peak_rss_bytes"}


def test_gpu_memory_is_growth_over_training_start_plus_absolute_and_reserved_peaks(monkeypatch):
    """The allocator's figures, faked: 6 GiB of frozen model resident at start, a 7.5 GiB peak."""
    gib = 2**30
    fake = {"memory_allocated": 6 * gib, "max_memory_allocated": 7.5 * gib, "max_memory_reserved": 8 * gib}
    for name, value in fake.items():
        monkeypatch.setattr(torch.cuda, name, lambda device=None, v=value: int(v))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    mem = PeakMemory(torch.device("cuda"))
    mem.start()
    assert mem.figures() == {"peak_mem_growth_bytes": int(1.5 * gib), "peak_mem_bytes": int(7.5 * gib),
                             "peak_reserved_bytes": 8 * gib}
    assert mem.keys == tuple(mem.figures())


def test_activation_and_state_bytes_match_a_hand_count():
    """Linear(8, 16) -> ReLU -> Linear(16, 4) on a batch of 5, fp32, every weight trainable.

    Saved for backward: the input x (5x8, for the first weight's gradient), the ReLU output (5x16, saved by
    the ReLU and again as the second Linear's input: one storage, counted once), the output (5x4, saved by
    the square in the loss) and the second weight's transpose (a view of a parameter: excluded). The first
    weight is not saved: x needs no gradient.
    State: 212 parameters (8*16+16 + 16*4+4), as many gradients, AdamW's two moments, and a 4-byte step
    counter for each of the 4 parameter tensors.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    activations = SavedActivations(model)
    with activations.recording():
        loss = model(torch.randn(5, 8)).square().mean()
    assert activations.bytes == 4 * (5 * 8 + 5 * 16 + 5 * 4)
    params = list(model.parameters())
    assert state_bytes(params, optimizer) is None  # no optimizer state before the first step
    loss.backward()
    optimizer.step()
    assert state_bytes(params, optimizer) == 4 * 212 * 4 + 4 * 4


def test_frozen_weights_casts_count_but_the_weights_do_not():
    """A frozen base saved for backward is resident anyway; a copy made in the forward is new memory."""
    base = nn.Linear(16, 16).requires_grad_(False)
    x = torch.randn(3, 16, requires_grad=True)
    activations = SavedActivations(base)
    with activations.recording():
        base(x).sum()                                   # saves W (a parameter): nothing counted
    assert activations.bytes == 0
    with activations.recording():
        (x @ (base.weight * 2).T).sum()                 # saves the scaled copy of W: 16*16 fp32
    assert activations.bytes == 16 * 16 * 4


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_matrix_ranks_of_low_rank_products(rank):
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(40, rank, generator=g) @ torch.randn(rank, 30, generator=g)
    r = matrix_ranks(delta)
    assert r["rank"] == rank and r["max_rank"] == 30
    assert 1.0 <= r["effective_rank"] <= rank + 1e-4


def test_matrix_ranks_of_zero_update():
    assert matrix_ranks(torch.zeros(5, 4)) == {"rank": 0, "effective_rank": 0.0, "max_rank": 4}


def test_results_written_atomically_and_read_back(tmp_path):
    record = {"schema": 1, "run": {"status": "success"}, "metrics": {"accuracy": torch.tensor(0.5)}}
    write_results(tmp_path, record)
    assert json.loads((tmp_path / "results.json").read_text())["metrics"]["accuracy"] == 0.5
    assert is_complete(tmp_path)
    assert not list(tmp_path.glob(".results.*"))  # no temp file left behind
    (tmp_path / "results.json").write_text("{ truncated")
    assert read_results(tmp_path) is None and not is_complete(tmp_path)
