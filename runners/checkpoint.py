"""Resumable training state, so a preempted or requeued job continues where it stopped.

Only trainable tensors are saved (the frozen backbone is reloaded from its pretrained files), together
with optimizer, scheduler, step, RNG states and the history collected so far. A resumed run reproduces
the uninterrupted run's metrics exactly on CPU.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

FILENAME = "checkpoint.pt"


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    state: dict[str, Any]) -> Path:
    """Atomically write the training state (temp file + rename)."""
    path = Path(run_dir) / FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)  # an `out_dir` run has no Hydra-made directory yet
    payload = {
        "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        **state,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, config_hash: str) -> dict[str, Any] | None:
    """Restore state saved by `save_checkpoint` for the same config; None when there is nothing to resume."""
    path = Path(run_dir) / FILENAME
    if not path.exists():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("config_hash") != config_hash:
        log.warning("ignoring %s: it was written by a different configuration", path)
        return None
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in payload["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    torch.set_rng_state(payload["torch_rng"])
    if payload.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["cuda_rng"])
    log.info("resuming from %s at step %d", path, payload["step"])
    return payload
