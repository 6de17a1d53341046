"""Helpers shared by the task tests (a plain module: conftest.py files are not importable by name)."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

CONF = Path(__file__).resolve().parents[2] / "conf"
SMALL = ["task.data.train_size=64", "task.data.test_size=48"]
TASKS = ["clip", "vision", "language"]


def compose_task(task: str, *overrides: str) -> DictConfig:
    """The full config `python run.py task=<task> <overrides>` would run."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"task={task}", *overrides])
