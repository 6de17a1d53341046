"""The training data stream: resumable sampler, DataLoader with workers, data wait, per-example
augmentation."""
import itertools

import numpy as np
import pytest
import torch

from runners.engine.loader import make_loader, resolve_workers, wait_summary
from tasks.sampling import ResumableSampler, TrainData

CPU = torch.device("cpu")
SIZES = {"a": 10, "b": 7}


def counting_data(in_memory: bool = True, keep_last: bool = False) -> tuple[TrainData, list]:
    """TrainData whose batches carry their own key, and the list of keys it was asked for (in this
    process)."""
    fetched = []

    def fetch(name: str, rows: list[int], epoch: int) -> dict:
        fetched.append((name, list(rows), epoch))
        return {"dataset": name, "rows": torch.tensor(rows), "epoch": torch.tensor(epoch)}

    return TrainData(dict(SIZES), fetch, in_memory=in_memory, keep_last=keep_last), fetched


def keys(sampler: ResumableSampler, n: int) -> list:
    return list(itertools.islice(iter(sampler), n))


@pytest.mark.parametrize("keep_last", [False, True])
def test_each_epoch_visits_every_example_once_per_dataset(keep_last):
    sampler = ResumableSampler(SIZES, batch_size=3, seed=0, keep_last=keep_last)
    stream = keys(sampler, 40)
    for name, size in SIZES.items():
        epoch0 = [i for n, rows, e in stream if n == name and e == 0 for i in rows]
        full = size if keep_last else size - size % 3
        assert len(epoch0) == full and len(set(epoch0)) == full and set(epoch0) <= set(range(size))
    assert [k[0] for k in stream[:4]] == ["a", "b", "a", "b"]  # datasets in turn
    assert any(e == 1 for *_, e in stream)  # reshuffled into a new epoch


def test_epochs_and_seeds_shuffle_differently():
    first = keys(ResumableSampler({"a": 12}, 12, seed=0), 2)
    other = keys(ResumableSampler({"a": 12}, 12, seed=1), 1)
    assert sorted(first[0][1]) == sorted(first[1][1]) == list(range(12))
    assert first[0][1] != first[1][1] and first[0][1] != other[0][1]


def test_a_restored_position_continues_the_same_stream():
    full = keys(ResumableSampler(SIZES, 3, seed=5), 30)
    resumed = ResumableSampler(SIZES, 3, seed=5)
    saved = ResumableSampler(SIZES, 3, seed=5)
    saved.position = 17
    resumed.load_state_dict(saved.state_dict())
    assert keys(resumed, 13) == full[17:]
    state = saved.state_dict()  # where the next batch of each dataset lies, for a reader
    assert state["next"]["b"]["epoch"] == full[17][2] and state["next"]["a"]["epoch"] == full[18][2]


def test_state_of_another_seed_is_refused():
    with pytest.raises(ValueError, match="seed 1, this run has seed 2"):
        ResumableSampler(SIZES, 3, seed=2).load_state_dict(ResumableSampler(SIZES, 3, seed=1).state_dict())


def test_ranks_split_each_global_batch():
    whole = keys(ResumableSampler(SIZES, 4, seed=0), 10)
    parts = [keys(ResumableSampler(SIZES, 4, seed=0, rank=r, world=2), 10) for r in range(2)]
    for n, (name, rows, epoch) in enumerate(whole):
        (n0, r0, e0), (n1, r1, e1) = parts[0][n], parts[1][n]
        assert n0 == n1 == name and e0 == e1 == epoch
        assert len(r0) == len(r1) == 2 and r0 + r1 == rows


def test_a_kept_last_batch_too_small_to_share_is_dropped_under_ddp():
    alone = keys(ResumableSampler({"a": 9}, 4, seed=0, keep_last=True), 3)
    pair = keys(ResumableSampler({"a": 9}, 4, seed=0, keep_last=True, rank=1, world=2), 3)
    assert [len(rows) for _, rows, _ in alone] == [4, 4, 1] and [e for *_, e in alone] == [0, 0, 0]
    # no empty batch
    assert [len(rows) for _, rows, _ in pair] == [2, 2, 2] and [e for *_, e in pair] == [0, 0, 1]


def test_resume_fetches_no_earlier_batch():
    data, fetched = counting_data()
    fresh = make_loader(data, 4, seed=3, num_workers=0, device=CPU)
    reference = fresh.take(2) + fresh.take(3)
    state = fresh.state_dict()  # what a checkpoint after these 2 steps (5 batches) stores
    reference += fresh.take(4)
    fetched.clear()
    resumed = make_loader(data, 4, seed=3, num_workers=0, device=CPU, state=state)
    tail = resumed.take(4)
    assert len(fetched) == 4  # batches 5..8 only: nothing replayed
    assert all(torch.equal(a["rows"], b["rows"]) for a, b in zip(tail, reference[5:], strict=True))
    assert resumed.state_dict()["position"] == 9
    assert len(resumed.waits) == 3 and resumed.waits[:2] == state["waits"]  # one wait per step, carried on


def test_workers_give_the_same_batches_and_prefetching_does_not_move_the_state():
    data, _ = counting_data(in_memory=False)
    inline = make_loader(data, 4, seed=1, num_workers=0, device=CPU)
    workers = make_loader(data, 4, seed=1, num_workers=2, device=CPU)
    try:
        for _ in range(6):
            a, b = next(inline), next(workers)
            assert a["dataset"] == b["dataset"] and torch.equal(a["rows"], b["rows"])
        # the workers ran ahead; the state did not
        assert workers.workers == 2 and workers.state_dict()["position"] == 6
    finally:
        workers.close()


def test_num_workers_auto_follows_the_job_and_the_data(monkeypatch):
    in_memory, _ = counting_data(in_memory=True)
    decoded, _ = counting_data(in_memory=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    assert resolve_workers("auto", in_memory) == 0  # tensors already in memory: workers only copy them
    assert resolve_workers("auto", decoded) == 5  # the job's CPUs, one left for the training process
    assert resolve_workers(3, in_memory) == 3


@pytest.mark.parametrize("bad", [-1, "four", 2.5, True])
def test_bad_num_workers_is_one_clear_error(bad):
    data, _ = counting_data()
    with pytest.raises(ValueError, match=r"^trainer.num_workers=.* is not valid: use an integer >= 0"):
        make_loader(data, 4, seed=0, num_workers=bad, device=CPU)


def test_batch_size_must_split_over_the_processes():
    data, _ = counting_data()
    with pytest.raises(ValueError, match=r"trainer\.batch_size=6 is not divisible by the 4 processes"):
        make_loader(data, 6, seed=0, num_workers=0, device=CPU, world=4)


def test_data_wait_summary_skips_warmup():
    waits = [5.0, 0.1, 0.3, 0.2, 0.4]
    assert wait_summary(waits, warmup=1) == {"data_wait_s": pytest.approx(0.25), "data_wait_p90_s": 0.4}
    assert wait_summary([], warmup=1) == {"data_wait_s": None, "data_wait_p90_s": None}


@pytest.mark.slow  # imports datasets and transformers
def test_augmentation_depends_on_example_and_epoch_not_on_batching():
    from datasets import Dataset, Image
    from PIL import Image as PILImage
    from transformers import CLIPImageProcessor

    from tasks.augment import Augment
    from tasks.pixels import LazyPixels

    rng = np.random.default_rng(0)
    images = [PILImage.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(4)]
    ds = Dataset.from_dict({"image": images}).cast_column("image", Image())
    pixels = LazyPixels(ds, CLIPImageProcessor(crop_size={"height": 16, "width": 16}), Augment(16), seed=7)
    together = pixels.training([0, 1, 2, 3], epoch=0)
    apart = torch.cat([pixels.training([2, 3], epoch=0), pixels.training([0, 1], epoch=0)])
    assert together.shape == (4, 3, 16, 16)
    assert torch.equal(together, apart[[2, 3, 0, 1]])  # same crop whatever batch/worker/rank it lands in
    assert not torch.equal(together, pixels.training([0, 1, 2, 3], epoch=1))  # new crops every epoch
