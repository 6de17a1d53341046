"""Experiment loggers: W&B (online, or offline without credentials or without a reachable server) and
`none`.

The local results.json is the source of truth; W&B mirrors it (config = resolved Hydra config,
history = per-step loss/lr/step time, summary = params/cost/metrics).
"""
from __future__ import annotations

import json
import logging
import netrc
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from omegaconf import DictConfig

log = logging.getLogger(__name__)

#: seconds to wait for the W&B server before running offline (GPU nodes often have no internet).
REACH_TIMEOUT_S = 3.0


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


def _server() -> str:
    return os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"


def _unreachable(url: str, timeout: float = REACH_TIMEOUT_S) -> str | None:
    """Why the W&B server at `url` cannot be reached within `timeout` seconds (None when it can).

    A TCP connect is enough: without one, `wandb.init` online waits for minutes, then fails the run. It
    runs in a daemon thread so that a slow DNS lookup (which ignores socket timeouts) is bounded too."""
    parts = urlsplit(url)
    address = (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(str(err) or type(err).__name__)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def wandb_mode(mode: str) -> str:
    """`logger.mode` made concrete. `auto`: online with credentials (or WANDB_MODE=online) and a server
    that answers within REACH_TIMEOUT_S, else offline, saying why in one log line."""
    if mode != "auto":
        return mode
    env_mode = os.environ.get("WANDB_MODE")
    if env_mode in ("offline", "disabled"):
        return env_mode
    if not (_has_wandb_credentials() or env_mode == "online"):
        return "offline"
    why = _unreachable(_server())
    if why is not None:
        log.warning("W&B server %s unreachable (%s): running offline; upload later with `wandb sync`",
                    _server(), why)
        return "offline"
    return "online"


class WandbLogger:
    """One W&B run per rankbench run, always finished (also when the run fails)."""

    def __init__(self, cfg: DictConfig, run_dir: Path, run_id: str, config: dict, group: str | None,
                 tags: list[str]) -> None:
        import wandb

        mode = wandb_mode(cfg.mode)
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
            log.info("W&B ran offline; upload later with: wandb sync %s", run_dir)


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


_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def offline_records(path: str | Path) -> Iterator[bytes]:
    """Serialized protobuf records of an offline `run-*.wandb` file (a LevelDB-style log).

    wandb ships no Python reader for its offline files; this lets tests and users check what an offline
    run holds before `wandb sync`. Layout: a 7-byte file header, then 32 KiB blocks of chunks, each
    with a 7-byte header (crc32, little-endian length, type); records may span blocks.
    """
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B offline run file")
    pos, parts = 7, []
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # block trailer too small for a header: padding
            pos += _BLOCK - pos % _BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (_FULL, _FIRST):
            parts = [chunk]
        elif kind in (_MIDDLE, _LAST):
            parts.append(chunk)
        if kind in (_FULL, _LAST):
            yield b"".join(parts)


def offline_summary(path: str | Path) -> dict[str, Any]:
    """The run summary (key -> value) recorded in an offline `run-*.wandb` file."""
    from wandb.proto import wandb_internal_pb2

    summary: dict[str, Any] = {}
    for raw in offline_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                key = item.key or "/".join(item.nested_key)
                summary[key] = json.loads(item.value_json)
    return summary
