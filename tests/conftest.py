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
