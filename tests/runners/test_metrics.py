"""Unit tests of the measurement helpers the runner applies identically to every method."""
import itertools
import json

import pytest
import torch

from runners.metrics import PeakMemory, StepTimer, matrix_ranks
from runners.results import is_complete, read_results, write_results
from runners.train import warmup_cosine


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
    assert mem.key == "peak_rss_bytes"
    mem.start()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB touched
    assert float(block.sum()) == block.numel()  # touched again right before reading: resident now
    peak = mem.peak()
    del block
    if peak is None:
        pytest.skip("no /proc/self/status on this platform")
    assert peak >= 48 * 2**20


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
