"""No silent fallbacks: a real-size run without a GPU, launchers that hide GPUs, an unreachable W&B."""
import logging
import socket

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from rbtest import compose_config

from runners.engine import config, env
from runners.record.logger import wandb_mode
from runners.train import RunFailed, run


@pytest.mark.parametrize("size", ["base", "large"])
def test_real_size_without_cuda_stops_naming_device_cpu(size, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=rf"size={size} needs a GPU but torch sees none.*pass device=cpu"):
        env.resolve_device("auto", size)
    assert env.resolve_device("cpu", size) == torch.device("cpu")  # asked for: allowed
    assert env.resolve_device("auto", "tiny") == torch.device("cpu")  # the embedded suite runs anywhere


def test_real_size_run_is_refused_once_before_anything_is_written(monkeypatch, tmp_path):
    """One line for the whole 21-dataset suite, not one failed results.json per dataset."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RunFailed, match=r"^size=base needs a GPU .*device=cpu"):
        run(compose_config(["size=base", "logger=none", f"out_dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "run").exists()


def test_cpu_run_records_no_gpu():
    assert env.gpu_info(torch.device("cpu")) is None


def _launcher(name: str):
    with initialize_config_dir(str(config.CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["+sweep=budget", f"hydra/launcher={name}"],
                      return_hydra_config=True)
    return cfg.hydra.launcher


@pytest.mark.parametrize("gpus", [0, 1, 4])
def test_local_launcher_gives_each_job_the_gpus_that_exist(gpus, monkeypatch):
    """submitit's local executor sets a job's CUDA_VISIBLE_DEVICES to 0..gpus_per_node-1 (unset: none)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    launcher = _launcher("local")
    assert launcher.gpus_per_node == gpus and launcher.tasks_per_node == 1
    assert instantiate(launcher).params["gpus_per_node"] == gpus  # what submitit is handed


def test_slurm_launcher_asks_for_one_gpu_per_single_task_run():
    launcher = _launcher("slurm")
    assert launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_wandb_with_a_key_but_no_server_runs_offline_with_one_line(monkeypatch, caplog):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    with caplog.at_level(logging.WARNING, logger="runners.record.logger"):
        assert wandb_mode("auto") == "offline"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "unreachable" in lines[0] and "offline" in lines[0], lines
    assert wandb_mode("online") == "online"  # asked for explicitly: no fallback


def test_wandb_without_credentials_or_when_told_stays_offline(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", "/nonexistent")
    monkeypatch.setenv("HOME", "/nonexistent")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode("auto") == "offline"
