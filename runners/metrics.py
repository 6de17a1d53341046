"""Measurements, defined once and applied identically to every method.

* step time: wall time of a full optimizer step (all micro-batches), CUDA-synchronised on GPU;
* peak memory: training-only peak. On CUDA the allocator's peak after a reset (`peak_mem_bytes`);
  on CPU the growth of the process's peak resident set size over the training phase (`peak_rss_bytes`).
  The two are different quantities and carry different names so they are never mixed;
* delta rank: numerical and effective rank of the learned weight update of sampled layers.
"""
from __future__ import annotations

import re
import statistics
import time
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")


class StepTimer:
    """Collects per-step wall times; statistics skip the first `warmup` steps (allocation, caches)."""

    def __init__(self, device: torch.device, warmup: int) -> None:
        self.device, self.warmup = device, warmup
        self.times: list[float] = []
        self._t0 = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        self._sync()
        dt = time.perf_counter() - self._t0
        self.times.append(dt)
        return dt

    def summary(self, samples_per_step: int) -> dict[str, float | None]:
        timed = self.times[self.warmup:] or self.times
        if not timed:
            return {"step_time_s": None, "step_time_p90_s": None, "samples_per_s": None}
        median = statistics.median(timed)
        p90 = sorted(timed)[min(len(timed) - 1, round(0.9 * (len(timed) - 1)))]
        return {"step_time_s": median, "step_time_p90_s": p90, "samples_per_s": samples_per_step / median}


def _vm_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class PeakMemory:
    """Training-only peak memory: CUDA allocator peak, or peak-RSS growth of this process on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._base = 0

    @property
    def key(self) -> str:
        return "peak_mem_bytes" if self.device.type == "cuda" else "peak_rss_bytes"

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = 0
            return
        _reset_rss_peak()
        self._base = (_vm_kib("VmRSS") or 0) * 1024

    def peak(self) -> int | None:
        """Bytes above the state at `start()`; None when the platform cannot tell."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        hwm = _vm_kib("VmHWM")
        return None if hwm is None else max(0, hwm * 1024 - self._base)


def _reset_rss_peak() -> None:
    """Linux resets VmHWM to the current RSS on `5` written to clear_refs; elsewhere the peak is lifetime.

    Freed heap memory that glibc keeps resident would otherwise serve the training phase's allocations
    without raising the RSS, so it is returned to the system first (malloc_trim, glibc only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


@torch.no_grad()
def matrix_ranks(delta: torch.Tensor) -> dict[str, float]:
    """Numerical rank (torch's default tolerance) and effective rank (exp of singular-value entropy)."""
    delta = delta.detach().float().cpu()
    s = torch.linalg.svdvals(delta)
    max_rank = min(delta.shape)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return {"rank": 0, "effective_rank": 0.0, "max_rank": max_rank}
    tol = float(s[0]) * max(delta.shape) * torch.finfo(torch.float32).eps
    p = s / s.sum()
    p = p[p > 0]
    effective = float(torch.exp(-(p * p.log()).sum()))
    return {"rank": int((s > tol).sum()), "effective_rank": effective, "max_rank": max_rank}
