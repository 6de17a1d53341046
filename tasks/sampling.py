"""Which examples form each training batch: a stream that is a pure function of the seed and a position.

A task's training data is map-style (`TrainData`); `ResumableSampler` says which batch comes next, so a
resumed run starts at its next batch and every data-parallel process takes its slice of the same batch.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

BatchKey = tuple[str, list[int], int]  # (dataset, example indices, epoch): everything a batch is made from


@dataclass(frozen=True)
class TrainData:
    """A task's training data, map-style: `fetch(dataset, indices, epoch)` builds one batch.

    The runner feeds it to a DataLoader whose sampler says which examples form each
    batch, so decoding and augmentation run in worker processes and a resumed run jumps straight to its
    next batch. `in_memory`: every example is already a tensor (tiny suites, pre-tokenised text), where
    worker processes would only add overhead. `keep_last`: an epoch's last, smaller batch is trained on
    (commonsense, as its official DataLoader does) instead of reshuffling first."""

    sizes: dict[str, int]
    fetch: Callable[[str, list[int], int], dict[str, Any]]
    in_memory: bool
    keep_last: bool = False


class ResumableSampler:
    """Forever: `BatchKey`s, one dataset after the other in turn, each dataset reshuffled every epoch.

    Epoch `e` of dataset `d` is the permutation seeded by (seed, d, e), so the whole stream is a pure
    function of the seed and of `position`, the number of batches already trained on: its state is that
    one number, and a resumed run starts at its next batch without producing an earlier one. With
    `world > 1` each process gets its `rank`-th slice of every batch (the global batch is unchanged)."""

    def __init__(self, sizes: dict[str, int], batch_size: int, seed: int, keep_last: bool = False,
                 rank: int = 0, world: int = 1) -> None:
        if not sizes or min(sizes.values()) <= 0:
            raise ValueError(f"no training examples to sample from (sizes {sizes})")
        self.sizes, self.batch_size, self.seed, self.keep_last = dict(sizes), batch_size, seed, keep_last
        self.rank, self.world = rank, world
        self.position = 0
        self._perms: dict[str, tuple[int, np.ndarray]] = {}

    def __iter__(self) -> Iterator[BatchKey]:
        n = self.position
        while True:
            yield self.key(n)
            n += 1

    def key(self, n: int) -> BatchKey:
        """The `n`-th batch of the stream (this process's slice of it)."""
        name, epoch, start, size = self.locate(n)
        indices = self._permutation(name, epoch)[start : start + size].tolist()
        share = len(indices) // self.world  # a short last batch loses at most world - 1 examples
        return name, indices[self.rank * share : (self.rank + 1) * share], epoch

    def locate(self, n: int) -> tuple[str, int, int, int]:
        """(dataset, epoch, offset in its permutation, batch size) of the `n`-th batch, in closed form."""
        names = list(self.sizes)
        name, k = names[n % len(names)], n // len(names)
        total = self.sizes[name]
        size = min(self.batch_size, total)
        full, tail = divmod(total, size)
        per_epoch = full + int(self.keep_last and tail >= self.world)  # a tail gives every process an example
        epoch, b = divmod(k, per_epoch)
        return name, epoch, b * size, min(size, total - b * size)

    def _permutation(self, name: str, epoch: int) -> np.ndarray:
        cached = self._perms.get(name)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed % 2**63, zlib.crc32(name.encode()), epoch])
            cached = self._perms[name] = (epoch, rng.permutation(self.sizes[name]))
        return cached[1]

    def state_dict(self) -> dict[str, Any]:
        """`position` restores the stream; where it lies (epoch, offset) per dataset is for reading."""
        where = {name: self.locate(self.position + i)[:3] for i, name in enumerate(self._order_from_here())}
        return {"position": self.position, "seed": self.seed,
                "next": {name: {"epoch": e, "offset": o} for name, (_, e, o) in where.items()}}

    def _order_from_here(self) -> list[str]:
        names = list(self.sizes)
        k = self.position % len(names)
        return names[k:] + names[:k]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, this run has seed {self.seed}")
        self.position = int(state["position"])


def batches(data: TrainData, batch_size: int, generator: torch.Generator) -> Iterator[dict[str, Any]]:
    """Forever: the batches of `data` in one process, in the order a seed drawn from `generator` gives
    (what `Task.train_batches` returns; the runner uses a DataLoader over the same pieces instead)."""
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    for key in ResumableSampler(data.sizes, batch_size, seed, data.keep_last):
        yield data.fetch(*key)
