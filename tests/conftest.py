"""Test-wide setup: everything runs offline, and W&B never tries the network."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "WANDB_MODE": "offline", "WANDB_SILENT": "true"}.items():
    os.environ.setdefault(key, value)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


import subprocess  # noqa: E402

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


def compose_config(overrides: list[str]) -> DictConfig:
    """The config `python run.py <overrides>` would run, composed from the real conf/ directory."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def run_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python run.py ARGS` in a subprocess, as a user would."""
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def tiny_overrides(tmp_path: Path) -> list[str]:
    """Overrides for a fast, offline, in-process run writing into a temporary run dir."""
    return [f"out_dir={tmp_path / 'run'}", "logger=none", "trainer.max_steps=4", "trainer.log_every=2",
            "trainer.timing_warmup=1", "trainer.checkpoint_every=0"]
