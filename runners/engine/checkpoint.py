"""Resumable training state, so a preempted or requeued job continues where it stopped.

Only trainable tensors are saved (the frozen backbone is reloaded from its pretrained files), together
with optimizer, scheduler, step, RNG states, the history collected so far and the training data stream's
state (`data`: the sampler's position, runners/engine/loader.py), so a resumed run fetches its next batch
and no earlier one. A resumed run reproduces the uninterrupted run's metrics exactly on CPU. In a
data-parallel run rank 0 alone writes the file (every rank holds the same trainable state) and every rank
reads it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: any rank's read failure

from runners.record.results import write_json

log = logging.getLogger(__name__)

FILENAME = "checkpoint.pt"
BEFORE = "before.json"  # the "before" evaluation and forgetting probe, kept so a requeue does not redo them


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    state: dict[str, Any]) -> Path:
    """Atomically write the training state (temp file + rename). Called by every rank: under FSDP each
    writes its shards of the trainable tensors and their optimizer state (`save_sharded`), then rank 0 the
    rest; otherwise rank 0 alone writes everything."""
    from runners.engine import distributed

    path = Path(run_dir) / FILENAME
    sharded = distributed.is_sharded(model)
    if not sharded and not distributed.is_main():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)  # an `out_dir` run has no Hydra-made directory yet
    tensors: dict[str, Any] = (
        {"sharded": save_sharded(run_dir, model, optimizer, state["step"])} if sharded else {
            "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
            "optimizer": optimizer.state_dict()})
    if distributed.is_main():
        payload = {**tensors, "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                   "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None, **state}
        tmp = path.with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)
        _drop_other_shards(run_dir, keep=tensors.get("sharded"))
    return path


SHARDED = "checkpoint-{step}.dcp"  # a folder of torch.distributed.checkpoint shards, one per step saved


def save_sharded(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> str:
    """Every rank writes its shards of the trainable tensors and their AdamW state into a new folder
    (torch.distributed.checkpoint); returns its name, which checkpoint.pt then points to, so a kill
    mid-write leaves the previous checkpoint whole."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    name = SHARDED.format(step=step)
    weights, optim = get_state_dict(model, optimizer, options=_shard_options())
    dcp.save({"model": weights, "optim": optim}, checkpoint_id=Path(run_dir) / name)
    return name


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read this rank's shards back into the FSDP model and optimizer (the frozen weights are not saved)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {folder.name}")
    weights, optim = get_state_dict(model, optimizer, options=_shard_options())
    both = {"model": weights, "optim": optim}
    dcp.load(both, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optim"],
                   options=_shard_options())


def _shard_options() -> Any:
    """What a sharded checkpoint holds: trainable tensors only (the frozen base is reloaded from its
    files)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _drop_other_shards(run_dir: Path, keep: str | None) -> None:
    """Remove the shard folders of earlier steps once checkpoint.pt points to a newer one (or to none)."""
    for folder in Path(run_dir).glob(SHARDED.format(step="*")):
        if folder.name != keep and folder.is_dir():
            shutil.rmtree(folder)


def remove_checkpoints(run_dir: Path) -> None:
    """A finished run's resumable state: checkpoint.pt, its shard folders and the kept "before" evaluation."""
    for name in (FILENAME, BEFORE):
        (Path(run_dir) / name).unlink(missing_ok=True)
    _drop_other_shards(run_dir, keep=None)


class CheckpointUnreadable(RuntimeError):
    """A checkpoint exists but cannot be read, and `trainer.on_bad_checkpoint=stop`; one line for the user."""


def _move_aside(path: Path) -> Path:
    """Rename `path` to `<name>.unreadable-<UTC time>` (rank 0, once every rank is done with it)."""
    from runners.engine import distributed

    aside = path.with_name(f"{path.name}.unreadable-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}")
    distributed.barrier()  # no rank may still be reading it
    if distributed.is_main() and path.exists():
        os.replace(path, aside)
    return aside


def unreadable(path: Path, err: BaseException, on_bad: str) -> None:
    """A checkpoint that cannot be read (a node lost mid-write, a truncated or foreign file, a missing shard):
    one line naming it and why, the file (or folder) moved aside beside it -- never deleted -- by rank 0
    once every rank has tried it; then the run starts over (`restart`) or stops (`stop`,
    CheckpointUnreadable)."""
    from runners.engine import distributed

    aside = _move_aside(path)
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    line = f"checkpoint {path} cannot be read ({type(err).__name__}: {reason}); moved to {aside.name}"
    if on_bad == "stop":
        raise CheckpointUnreadable(f"{line}; stopping (trainer.on_bad_checkpoint=stop; "
                                   "restart trains from step 0)")
    if distributed.is_main():  # one line, not one per rank
        log.warning("%s; training from the start (trainer.on_bad_checkpoint=restart)", line)


def load_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, config_hash: str, on_bad: str = "restart") -> dict[str, Any] | None:
    """Restore state saved by `save_checkpoint` for the same config; None when there is nothing to resume
    (or the file cannot be read and `on_bad` is restart, see `unreadable`)."""
    path = Path(run_dir) / FILENAME
    if not path.exists():
        return None
    try:  # memory-mapped: a full fine-tuning checkpoint of an 8B model (~45 GiB with AdamW state) is paged
        # in tensor by tensor as it is copied, never read whole into a job's RAM
        payload = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # any failure to read is the same: the file is unusable
        unreadable(path, err, on_bad)
        return None
    if payload.get("config_hash") != config_hash:
        log.warning("ignoring %s: it was written by a different configuration", path)
        return None
    if payload.get("sharded"):
        try:
            load_sharded(Path(run_dir) / payload["sharded"], model, optimizer)
        except (Exception, CheckpointException) as err:  # a missing or truncated shard
            _move_aside(path)
            unreadable(Path(run_dir) / payload["sharded"], err, on_bad)
            return None
    else:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in payload["trainable"].items():
                params[name].copy_(value)
        optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    torch.set_rng_state(payload["torch_rng"])
    if payload.get("cuda_rng") is not None and torch.cuda.is_available():
        for device, rng in cuda_rng_states(payload["cuda_rng"], torch.cuda.device_count()):
            torch.cuda.set_rng_state(rng, device)
    log.info("resuming from %s at step %d", path, payload["step"])
    return payload


def save_before(run_dir: Path, config_hash: str, metrics: dict[str, Any],
                probe: dict[str, float] | None) -> None:
    """Atomically keep the evaluation of the untrained model: on a large suite it takes as long as many
    training steps, and a requeued job would otherwise repeat it on every requeue."""
    write_json(Path(run_dir) / BEFORE, {"config_hash": config_hash, "metrics": metrics, "probe": probe})


def load_before(run_dir: Path, config_hash: str) -> dict[str, Any] | None:
    """{metrics, probe} saved by `save_before` for the same config; None when the run must evaluate."""
    path = Path(run_dir) / BEFORE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("config_hash") != config_hash:
        log.warning("ignoring %s: it was written by a different configuration", path)
        return None
    log.info("untrained model's evaluation read from %s (not repeated)", path)
    return saved


def cuda_rng_states(saved: list[torch.Tensor], visible: int) -> list[tuple[int, torch.Tensor]]:
    """(device, state) to restore: a requeued job may see fewer (or more) GPUs than the one that saved,
    where `set_rng_state_all` would fail; the devices both have are restored, the difference logged."""
    if len(saved) != visible:
        log.warning("checkpoint has CUDA RNG states of %d devices, this job sees %d: restoring %d",
                    len(saved), visible, min(len(saved), visible))
    return list(enumerate(saved[:visible]))


class PreemptionGuard:
    """Defers the cluster's "you are about to be stopped" signal to the end of the current optimizer step.

    SLURM (through submitit) sends SIGUSR2 before a time limit or on preemption; submitit's handler then
    requeues the job and exits. The training loop saves a checkpoint of the step it just finished and
    only then hands the signal over (`hand_over`), so the requeued job resumes exactly there instead of at
    the last periodic checkpoint. Outside the main thread (where handlers cannot be set) it does nothing.
    """

    def __init__(self, signum: int = signal.SIGUSR2) -> None:
        self.signum = signum
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> PreemptionGuard:
        try:
            self._previous = signal.signal(self.signum, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        log.warning("received signal %d: checkpointing after this step, then handing over", signum)

    def hand_over(self) -> None:
        """Restore the previous handler (submitit's requeue, or the default) and deliver the signal to it."""
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None
        os.kill(os.getpid(), self.signum)
