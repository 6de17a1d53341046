"""What produced a run: the project's git commit (and whether the checkout was dirty) and package versions."""
from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import subprocess
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
_VERSIONED = ("torch", "transformers", "hydra-core", "datasets", "safetensors", "wandb", "numpy", "peft")


def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the project checkout, or (None, None) outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions
