"""Experiment loggers: W&B (online, or offline without credentials) and `none`.

The local results.json is the source of truth; W&B mirrors it (config = resolved Hydra config,
history = per-step loss/lr/step time, summary = params/cost/metrics).
"""
from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

log = logging.getLogger(__name__)


class NullLogger:
    """`logger=none`: logs nothing."""

    def log(self, data: dict[str, Any], step: int) -> None:
        pass

    def summary(self, data: dict[str, Any]) -> None:
        pass

    def finish(self, failed: bool) -> None:
        pass


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLogger:
    """One W&B run per rankbench run, always finished (also when the run fails)."""

    def __init__(self, cfg: DictConfig, run_dir: Path, run_id: str, config: dict, group: str | None,
                 tags: list[str]) -> None:
        import wandb

        mode = cfg.mode
        if mode == "auto":
            mode = "online" if (_has_wandb_credentials() or os.environ.get("WANDB_MODE") == "online") \
                else "offline"
        self.mode = mode
        self._wandb = wandb
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, group=group, tags=tags, name=run_id,
                              config=config, dir=str(run_dir), mode=mode, reinit="finish_previous",
                              settings=wandb.Settings(silent=True, console="off"))

    def log(self, data: dict[str, Any], step: int) -> None:
        self.run.log(data, step=step)

    def summary(self, data: dict[str, Any]) -> None:
        for key, value in _flatten(data).items():
            self.run.summary[key] = value

    def finish(self, failed: bool) -> None:
        run_dir = Path(self.run.dir).parent
        self.run.finish(exit_code=1 if failed else 0)
        if self.mode == "offline":
            log.info("W&B ran offline (no credentials); upload later with: wandb sync %s", run_dir)


def make_logger(cfg: DictConfig, run_dir: Path, run_id: str, config: dict, group: str | None,
                tags: list[str]) -> NullLogger | WandbLogger:
    """Logger named by `logger.name`; see conf/logger/."""
    if cfg.name == "none":
        return NullLogger()
    if cfg.name == "wandb":
        return WandbLogger(cfg, run_dir, run_id, config, group, tags)
    raise ValueError(f"unknown logger {cfg.name!r}; valid: wandb, none")


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat
