"""Test-wide setup: everything runs offline, W&B never tries the network, helpers in tests/rbtest.py."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "WANDB_MODE": "offline", "WANDB_SILENT": "true"}.items():
    os.environ.setdefault(key, value)
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


@pytest.fixture
def tiny_overrides(tmp_path: Path) -> list[str]:
    """Overrides for a fast, offline, in-process run writing into a temporary run dir."""
    return [f"out_dir={tmp_path / 'run'}", "logger=none", "trainer.max_steps=4", "trainer.log_every=2",
            "trainer.timing_warmup=1", "trainer.checkpoint_every=0", "trainer.batch_size=16",
            "task.data.train_size=64", "task.data.test_size=32", "threads=1"]
