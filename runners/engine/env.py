"""Where a run happens: its device, CPU threads and seeded random state."""
from __future__ import annotations

import logging
import os
import platform
import random
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

#: sizes that run the papers' real models: days on a CPU, so `device=auto` never quietly picks one.
GPU_SIZES = ("base", "large")


def resolve_device(name: str, size: str = "tiny") -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without one is an error, not a silent CPU run.

    `auto` falls back to the CPU only for the embedded suite (`size=tiny`): a `size=base|large` run on a
    node whose GPU is hidden (a launcher with no GPUs, a CPU-only torch) stops instead of crawling on.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if size in GPU_SIZES:
            hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
            why = f" (CUDA_VISIBLE_DEVICES={hidden!r})" if hidden is not None else ""
            raise ValueError(f"size={size} needs a GPU but torch sees none{why}; "
                             f"pass device=cpu to run it on the CPU anyway")
        return torch.device("cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r} is not valid; use auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda was requested but torch sees no CUDA device; use device=cpu or auto")
    return torch.device(name)


def set_threads(threads: int | None) -> None:
    """Pin torch's intra-op CPU threads (null keeps torch's default: one per core).

    On a shared or oversubscribed CPU, fewer threads than cores avoids threads spinning against each other.
    """
    if threads:
        torch.set_num_threads(int(threads))


def seed_everything(seed: int) -> torch.Generator:
    """Seed every RNG a run touches and return the generator that drives its data order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def gpu_info(device: torch.device) -> dict[str, Any] | None:
    """{name, count} of the GPUs this process sees (results of different GPU models are not comparable
    on cost); None on the CPU, which never touches CUDA."""
    if device.type != "cuda":
        return None
    return {"name": torch.cuda.get_device_name(device), "count": torch.cuda.device_count()}


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return (f"cpu:{platform.processor() or platform.machine()} x{os.cpu_count()} "
            f"threads={torch.get_num_threads()}")
