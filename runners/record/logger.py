"""Experiment loggers: W&B (online, or offline without credentials or without a reachable server) and
`none`.

The local results.json is the source of truth; W&B mirrors it (config = resolved Hydra config,
history = per-step loss/lr/step time, summary = params/cost/metrics). A W&B run is named by what tells it
from its siblings (`run_name`: dataset, method, budget, seed; the full run id is in its summary). The runs
of one suite share a group (`logger.group`, else the suite's run id), and the suite's mean and per-dataset
table go to one more run of that group (`log_suite`, job type `suite`), where the W&B group view shows it.
"""
from __future__ import annotations

import json
import logging
import netrc
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from omegaconf import DictConfig

log = logging.getLogger(__name__)

#: seconds to wait for the W&B server before running offline (GPU nodes often have no internet).
REACH_TIMEOUT_S = 3.0
#: W&B job type of a suite's summary run (`log_suite`); readers of a W&B project skip it (analysis.load).
SUITE_JOB_TYPE = "suite"


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


def run_name(config: dict[str, Any]) -> str:
    """'eurosat-randlora-lora8-s0': dataset (the task for a suite or a one-dataset task), method, budget,
    seed, from a run's resolved config."""
    where = config.get("dataset") or config["task"]["name"]
    budget = config["budget"] if config.get("budget") is not None else "nobudget"
    return f"{where}-{config['method']['name']}-{budget}-s{config['seed']}"


def suite_group(cfg: DictConfig, suite_id: str) -> str | None:
    """The W&B group of a suite's runs: `logger.group` when set, else the suite's run id (None with no W&B,
    so that `logger=none` records stay as they were)."""
    return None if cfg.name == "none" else cfg.get("group") or suite_id


class WandbLogger:
    """One W&B run per rankbench run, always finished (also when the run fails)."""

    def __init__(self, cfg: DictConfig, run_dir: Path, run_id: str, config: dict, group: str | None,
                 tags: list[str], job_type: str = "train", name: str | None = None) -> None:
        import wandb

        mode = wandb_mode(cfg.mode)
        self.mode = mode
        self._wandb = wandb
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, group=group, tags=tags,
                              name=name or run_name(config), job_type=job_type, config=config,
                              dir=str(run_dir), mode=mode, reinit="finish_previous",
                              settings=wandb.Settings(silent=True, console="off"))
        self.run.summary["run_id"] = run_id

    def log(self, data: dict[str, Any], step: int) -> None:
        self.run.log(data, step=step)

    def summary(self, data: dict[str, Any]) -> None:
        for key, value in _flatten(data).items():
            self.run.summary[key] = value

    def table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A `wandb.Table` under `key` (shown in the run's and its group's workspace)."""
        self.run.log({key: self._wandb.Table(columns=columns, data=rows)})

    def finish(self, failed: bool) -> None:
        run_dir = Path(self.run.dir).parent
        self.run.finish(exit_code=1 if failed else 0)
        if self.mode == "offline":
            log.info("W&B ran offline; upload later with: wandb sync %s", run_dir)


def make_logger(cfg: DictConfig, run_dir: Path, run_id: str, config: dict, group: str | None,
                tags: list[str], job_type: str = "train",
                name: str | None = None) -> NullLogger | WandbLogger:
    """Logger named by `logger.name`; see conf/logger/."""
    if cfg.name == "none":
        return NullLogger()
    if cfg.name == "wandb":
        return WandbLogger(cfg, run_dir, run_id, config, group, tags, job_type, name)
    raise ValueError(f"unknown logger {cfg.name!r}; valid: wandb, none")


def log_suite(cfg: DictConfig, run_dir: Path, record: dict[str, Any], failed: bool) -> None:
    """The suite's record as a W&B run of its group: summary = params/cost/metrics (metrics/accuracy is the
    mean over datasets), plus a `per_dataset` table (dataset, accuracy before and after; the mean last)."""
    run = record["run"]
    logger = make_logger(cfg, run_dir, run["id"], run["config"], suite_group(cfg, run["id"]),
                         [run["method"], run["task"], run["size"], "suite"], job_type=SUITE_JOB_TYPE,
                         name=f"{run_name(run['config'])}-mean")
    try:
        logger.summary({k: record[k] for k in ("params", "cost", "metrics")})
        if isinstance(logger, WandbLogger):
            columns = ["dataset", "accuracy_before", "accuracy"]
            logger.table("per_dataset", columns, suite_rows(record["metrics"]))
    finally:
        logger.finish(failed=failed)


def suite_rows(metrics: dict[str, Any]) -> list[list[Any]]:
    """[dataset, accuracy before, accuracy after] per finished dataset, then the suite's mean."""
    before = metrics.get("per_dataset_before") or {}
    rows = [[name, before.get(name), acc] for name, acc in metrics["per_dataset"].items()]
    return [*rows, ["mean", metrics.get("accuracy_before"), metrics.get("accuracy")]]


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


def wait_until_written(path: str | Path, timeout_s: float = 30.0) -> Path:
    """`path` once its run's exit record is in it. wandb's service process writes an offline run file
    after `run.finish()` has returned (observed with wandb 0.31: the file can still hold only its 7-byte
    header), so a reader right after a run waits for it; a TimeoutError names the file otherwise."""
    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for raw in offline_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") == "exit":
                return Path(path)
        time.sleep(0.1)
    raise TimeoutError(f"{path}: no exit record after {timeout_s:g} s (the W&B run did not finish writing)")


def offline_run_info(path: str | Path) -> dict[str, str]:
    """The name, group and job type an offline `run-*.wandb` file will show in W&B once synced."""
    from wandb.proto import wandb_internal_pb2

    for raw in offline_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "run":
            run = record.run
            return {"name": run.display_name, "group": run.run_group, "job_type": run.job_type}
    raise ValueError(f"{path} holds no run record")
