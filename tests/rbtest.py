"""Helpers shared by the test packages: compose the real configs, run the real command line."""
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parent.parent


def compose_config(overrides: list[str]) -> DictConfig:
    """The config `python run.py <overrides>` would run, composed from the real conf/ directory."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def run_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python run.py ARGS` in a subprocess, as a user would."""
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, check=False)
