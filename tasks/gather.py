"""What a loss needs from the other data-parallel processes: their rows, and their token counts.

Both are the identity when no process group runs, so a task's loss reads the same in one process.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class _GatherRows(torch.autograd.Function):
    """Concatenate every process's rows (rank order); the gradient of this process's own rows is the sum
    of every process's gradient for them (all_reduce works on every backend, gloo included)."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, rows.contiguous())
        ctx.start, ctx.stop = dist.get_rank() * len(rows), (dist.get_rank() + 1) * len(rows)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.start : ctx.stop]


def _processes() -> int:
    """How many data-parallel processes train this run (1 when no process group runs)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every data-parallel process's rows of `rows` (equal counts: each takes an equal slice of the global
    batch), differentiable: a loss that contrasts each example with the whole global batch (CLIP's
    in-batch loss) then sees the single-process batch. With DDP's gradient averaging, a loss over this
    process's rows against the gathered ones trains exactly as one process on the global batch.
    The rows themselves when no process group runs."""
    return rows if _processes() == 1 else _GatherRows.apply(rows)


def per_process_share(count: torch.Tensor) -> torch.Tensor:
    """The divisor that makes a per-token mean exact under data parallelism: every process's `count` summed,
    over the number of processes. A process's `total / per_process_share(count)`, averaged by DDP, is the
    global batch's per-token mean, not the mean of per-process means (they differ when processes hold
    different token counts). `count` itself (at least 1) in a single process."""
    if _processes() == 1:
        return count.clamp(min=1)
    every = count.detach().to(torch.float64).clone()
    dist.all_reduce(every)
    return (every.clamp(min=1) / _processes()).to(count.dtype if count.is_floating_point() else torch.float32)
