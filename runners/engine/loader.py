"""Training data at scale: one DataLoader per run, built here and nowhere else.

A task exposes its training data map-style (`Task.train_data()`, a `tasks.sampling.TrainData`: sizes per
dataset plus `fetch(dataset, indices, epoch) -> batch`). Here a `ResumableSampler` says which examples
form each batch and a `torch.utils.data.DataLoader` fetches them, in worker processes when fetching
is real work (image decoding and augmentation, tokenisation), so the timed step measures the model,
not the JPEG decoder. The sampler's position is what a checkpoint stores: a resumed run starts at its
next batch and fetches none of the earlier ones.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from runners.engine.measure import median_and_p90
from tasks.sampling import BatchKey, ResumableSampler, TrainData

log = logging.getLogger(__name__)

#: most worker processes a run starts by itself (`num_workers: auto`); beyond this decoding rarely is
#: the bottleneck and every worker holds a copy of the task's Python objects.
MAX_AUTO_WORKERS = 16


class BatchDataset(Dataset):
    """Map-style dataset whose items are whole batches: `dataset[key]` is `fetch(*key)`. A worker builds
    one whole batch (decodes, augments, collates), so no per-example collate runs in the main process."""

    def __init__(self, data: TrainData) -> None:
        self.data = data

    def __getitem__(self, key: BatchKey) -> dict[str, Any]:
        return self.data.fetch(*key)


def available_cpus() -> int:
    """CPUs this job may use: SLURM's per-task allocation, else this process's CPU affinity."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    if slurm and slurm.isdigit():
        return int(slurm)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no sched_getaffinity
        return os.cpu_count() or 1


def resolve_workers(setting: Any, data: TrainData) -> int:
    """`trainer.num_workers`: an integer >= 0, or `auto`: none for in-memory tensors (a worker would
    only copy tensors between processes), else the job's CPUs minus one for the training process,
    at most MAX_AUTO_WORKERS."""
    if setting == "auto":
        return 0 if data.in_memory else max(0, min(MAX_AUTO_WORKERS, available_cpus() - 1))
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise ValueError(f"trainer.num_workers={setting!r} is not valid: use an integer >= 0 (0: load in the "
                         f"training process) or auto (the job's CPUs minus one; 0 for in-memory data)")
    return setting


def _seed_worker(worker_id: int) -> None:
    """Seed numpy and `random` in each worker from torch's per-worker seed (the DataLoader derives it
    from the loader's generator), so nothing in a worker draws from a copy of the parent's state.
    Batch content itself depends only on its key (see `ResumableSampler`), never on these."""
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class TrainLoader:
    """Forever: training batches of this process, the time training waited for them, and the data state
    a checkpoint stores.

    The DataLoader's workers run ahead of training by a few batches; `state_dict()` counts only the
    batches handed to training, so a checkpoint never skips a batch that was prefetched but not used."""

    def __init__(self, data: TrainData, sampler: ResumableSampler, workers: int, pin_memory: bool,
                 seed: int, waits: list[float]) -> None:
        self.sampler, self.workers, self.waits = sampler, workers, waits
        # the task is inherited, not pickled
        context = "fork" if workers and sys.platform == "linux" else None
        self.loader = DataLoader(BatchDataset(data), batch_size=None, sampler=sampler, num_workers=workers,
                                 pin_memory=pin_memory, persistent_workers=workers > 0,
                                 worker_init_fn=_seed_worker if workers else None,
                                 multiprocessing_context=context,
                                 generator=torch.Generator().manual_seed(seed))
        self._it: Iterator[dict[str, Any]] | None = None

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            self._it = iter(self.loader)  # the sampler starts at its (possibly restored) position
        batch = next(self._it)
        self.sampler.position += 1
        return batch

    def take(self, n: int) -> list[dict[str, Any]]:
        """The `n` micro-batches of one optimizer step, fetched before its timer starts; the wait for
        them is recorded in `waits` (the step time then covers compute only)."""
        start = time.perf_counter()
        batches = [next(self) for _ in range(n)]
        self.waits.append(time.perf_counter() - start)
        return batches

    def state_dict(self) -> dict[str, Any]:
        return {**self.sampler.state_dict(), "waits": list(self.waits)}

    def close(self) -> None:
        """Stop the worker processes (the stream is infinite, so they never stop by themselves): the
        iterator, also kept by the loader (persistent workers), shuts them down once released."""
        self._it = None
        self.loader = None


def batch_split_problem(batch_size: int, world: int) -> str | None:
    """Why `batch_size` cannot be split evenly over `world` processes (None when it can): the effective
    batch of a data-parallel run is the single-process one, so each process takes batch_size / world."""
    if batch_size % world == 0:
        return None
    return (f"trainer.batch_size={batch_size} is not divisible by the {world} processes of this run; "
            f"use a multiple of {world} (each process trains on batch_size / {world})")


def make_loader(data: TrainData, batch_size: int, seed: int, num_workers: Any, device: torch.device,
                state: dict[str, Any] | None = None, rank: int = 0, world: int = 1) -> TrainLoader:
    """The run's training stream: global batches of `batch_size`, this process's `rank`-th slice of each
    when `world` processes train together, starting where `state` (a checkpoint's) says."""
    if (problem := batch_split_problem(batch_size, world)) is not None:
        raise ValueError(problem)
    workers = resolve_workers(num_workers, data)
    if workers and not data.in_memory:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # fast tokenizers warn once forked
    sampler = ResumableSampler(data.sizes, batch_size, seed, data.keep_last, rank, world)
    if state is not None:
        sampler.load_state_dict(state)
    log.info("training data: %d worker processes, starting at batch %d", workers, sampler.position)
    return TrainLoader(data, sampler, workers, pin_memory=device.type == "cuda", seed=seed,
                       waits=list(state["waits"]) if state is not None else [])


def wait_summary(waits: list[float], warmup: int) -> dict[str, float | None]:
    """`data_wait_s` (median) and `data_wait_p90_s` of the per-step waits for data, the first `warmup`
    steps (worker start-up) excluded as for step times: what the step would cost if data were not ready."""
    median, p90 = median_and_p90(waits, warmup)
    return {"data_wait_s": median, "data_wait_p90_s": p90}
