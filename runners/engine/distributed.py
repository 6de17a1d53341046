"""Data-parallel training of one run over several GPUs (or CPU processes) with torch.distributed.

Launched by `torchrun --nproc_per_node=N run.py ...` or by SLURM through submitit with
`tasks_per_node = gpus_per_node` (conf/hydra/launcher/slurm.yaml): every process runs the same `run(cfg)`,
trains on its slice of each global batch (`trainer.batch_size` / world size, so the effective batch
micro-batch x accumulation x world size is the single-process one), and DDP averages the gradients.
Rank 0 alone writes results.json, checkpoints, the adapter and W&B; every rank evaluates the same
(unwrapped, identical) model, so no rank waits at a barrier through a long evaluation.

The process group is started once per process (NCCL on CUDA, gloo on the CPU) and reused by every run
of that process (the datasets of a suite), then destroyed at exit.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

PORT_BASE = 20000  # MASTER_PORT under SLURM / submitit local: PORT_BASE + job id mod PORT_SPAN
PORT_SPAN = 20000


@dataclass(frozen=True)
class World:
    """This process's place among the processes training one run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files, logs and W&B."""
        return self.rank == 0


_CURRENT = World()


def current() -> World:
    """The world of this process (a single process until `setup` starts a group)."""
    return _CURRENT


def is_main() -> bool:
    return _CURRENT.main


def first_host(nodelist: str) -> str:
    """The first host of a SLURM nodelist: `gpu[07-09,12],cpu1` -> `gpu07` (zero padding kept)."""
    head = re.match(r"[^,\[]+(\[[^\]]*\])?", nodelist.strip())
    if head is None or not head.group(0):
        raise ValueError(f"cannot read a host name from the SLURM nodelist {nodelist!r}")
    name = head.group(0)
    if "[" not in name:
        return name
    prefix, ranges = name.split("[", 1)
    return prefix + re.split(r"[-,\]]", ranges, maxsplit=1)[0]


def from_env(env: Mapping[str, str]) -> tuple[World, dict[str, str]]:
    """(world, MASTER_ADDR/MASTER_PORT to set) from the launcher's variables: torchrun's RANK/WORLD_SIZE/
    LOCAL_RANK (it sets the master itself), the tasks of a SLURM step (SLURM_PROCID, SLURM_STEP_NUM_TASKS,
    SLURM_LOCALID; master = the step's first node), or submitit's local executor (SUBMITIT_LOCAL_*)."""
    if "WORLD_SIZE" in env and "RANK" in env:
        return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))), {}
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:  # srun's tasks (submitit runs them so)
        world = World(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]),
                      int(env.get("SLURM_LOCALID", 0)))
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        return world, _master(first_host(nodes), env.get("SLURM_JOB_ID", "0"))
    if "SUBMITIT_LOCAL_NTASKS" in env:
        world = World(int(env.get("SUBMITIT_LOCAL_GLOBALID", 0)), int(env["SUBMITIT_LOCAL_NTASKS"]),
                      int(env.get("SUBMITIT_LOCAL_LOCALID", 0)))
        return world, _master("127.0.0.1", env.get("SUBMITIT_LOCAL_JOB_ID", "0"))
    return World(), {}


def planned() -> World:
    """The world the launcher asks for, read before any process group is started."""
    return from_env(os.environ)[0]


def _master(host: str, job_id: str) -> dict[str, str]:
    digits = re.sub(r"\D", "", job_id) or "0"
    return {"MASTER_ADDR": host, "MASTER_PORT": str(PORT_BASE + int(digits) % PORT_SPAN)}


def setup(device: torch.device) -> tuple[World, torch.device]:
    """Join the run's process group (once per process) and return (world, this process's device:
    `cuda:<local rank>` on GPUs). A single process is returned as it is, nothing started."""
    global _CURRENT
    world, master = from_env(os.environ)
    if world.size > 1 and not dist.is_initialized():
        for key, value in master.items():
            os.environ.setdefault(key, value)
        if device.type == "cuda":
            torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=world.rank,
                                world_size=world.size)
        atexit.register(dist.destroy_process_group)
        log.info("data-parallel run: rank %d of %d (%s)", world.rank, world.size, dist.get_backend())
        if not world.main:  # one process reports; the others say only what goes wrong
            logging.getLogger().setLevel(logging.WARNING)
    _CURRENT = world
    if device.type == "cuda" and world.size > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    return world, device


STRATEGIES = ("ddp", "fsdp")


def strategy_name(configured: str) -> str:
    """How this process trains: `single` alone, else the configured `trainer.strategy`."""
    return "single" if _CURRENT.size == 1 else str(configured)


def barrier() -> None:
    """Wait for every process of the run (nothing to wait for alone)."""
    if _CURRENT.size > 1:
        dist.barrier()


def agree(value: Any) -> Any:
    """Rank 0's `value` on every rank (e.g. the run directory: Hydra's timestamped one can differ)."""
    if _CURRENT.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class TaskLoss(nn.Module):
    """`task.loss(model, batch)` as a module's forward: DistributedDataParallel synchronises gradients
    only of computations run through its own forward, and tasks call submodules of the model."""

    def __init__(self, model: nn.Module, task: Any) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self, batch: Any) -> torch.Tensor:
        return self.task.loss(self.model, batch)


def wrap(model: nn.Module, task: Any, device: torch.device, find_unused: bool,
         strategy: str = "ddp") -> nn.Module:
    """The module a training step calls: `TaskLoss`, inside DDP or FSDP when several processes train.
    Only trainable parameters are reduced. `find_unused` (DDP): some trainable parameters get no gradient
    in a step (one head per dataset of a round-robin suite); otherwise DDP would wait for them forever.
    FSDP replaces the model's parameters by sharded ones: build the optimizer after this."""
    loss = TaskLoss(model, task)
    if _CURRENT.size == 1:
        return loss
    if strategy == "fsdp":
        return shard(loss, model)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(loss, device_ids=ids, find_unused_parameters=find_unused)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: modules of the classes transformers names in `_no_split_modules`
    (LlamaDecoderLayer, CLIPEncoderLayer, ...), the unit FSDP shards and gradient checkpointing recomputes.
    ValueError when the model names none."""
    names = set()
    for module in model.modules():
        names |= set(getattr(module, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no transformer blocks to shard (no module class "
                         "listed in _no_split_modules); trainer.strategy=fsdp needs a transformers model "
                         "with repeated blocks")
    return blocks


def shard(loss: TaskLoss, model: nn.Module) -> nn.Module:
    """FSDP2 (`fully_shard`): each transformer block one unit -- its weights, gradients and optimizer state
    split over the processes, gathered for its forward and backward only -- and the rest (embeddings, heads)
    with the root, the module whose forward every step calls. Precision stays the trainer's (bf16 autocast
    on CUDA), as under DDP, so the strategies compute the same thing."""
    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():
        for param in model.parameters():  # FSDP2 shards row-major storage only; LoRA keeps B column-major
            if not param.is_contiguous():  # for speed (methods/lora.py), a layout, not a value
                param.data = param.data.contiguous()
    scalars = {p for p in model.parameters() if p.dim() == 0}  # FSDP2 refuses them (CLIP's logit_scale)
    for param in scalars:
        if param.requires_grad:  # left whole on every rank: its gradient is averaged here
            param.register_post_accumulate_grad_hook(_average_gradient)
    for block in transformer_blocks(model):
        fully_shard(block, ignored_params=scalars)
    return fully_shard(loss, ignored_params=scalars)


def _average_gradient(param: torch.Tensor) -> None:
    """All-reduce a replicated parameter's gradient to its mean after each micro-batch's backward; the mean
    is linear, so averaging again after the next micro-batch adds that micro-batch's mean."""
    param.grad.div_(_CURRENT.size)
    dist.all_reduce(param.grad)


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP holds this model's parameters as shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def gather_for_evaluation(model: nn.Module) -> None:
    """After FSDP training: every parameter whole again, a plain tensor on every rank, and FSDP's hooks
    and classes removed, so evaluation, update ranks and the adapter export see the model as one process
    does (the model is then held whole, as DDP holds it). A no-op for an unsharded model."""
    if not is_sharded(model):
        return
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for module in model.modules():  # the same order on every rank: full_tensor() all-gathers
            for name, p in list(module._parameters.items()):
                if isinstance(p, DTensor):
                    module._parameters[name] = nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)
            if isinstance(module, FSDPModule):
                module._forward_pre_hooks.clear()
                module._forward_hooks.clear()
                module.__class__ = type(module).__bases__[1]  # FSDP<Cls>(FSDPModule, Cls) -> Cls


def accumulating(module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """For every micro-batch of a step but the last, no gradient exchange (DDP's `no_sync()`, FSDP's
    `set_requires_gradient_sync(False)`): gradients are averaged (FSDP: reduce-scattered) once."""
    if last:
        return contextlib.nullcontext()
    if isinstance(module, nn.parallel.DistributedDataParallel):
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):
        return _without_gradient_sync(module)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _without_gradient_sync(module: Any) -> Any:
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def strategy_problem(strategy: str, processes: int, task_cfg: Any) -> str | None:
    """One line for a strategy this run cannot use, checked before anything is built: FSDP alone (nothing
    to shard over) or on a model whose blocks the wrapping policy cannot find (its meta skeleton)."""
    if strategy != "fsdp":
        return None
    if processes == 1:
        return ("trainer.strategy=fsdp needs several processes (torchrun --nproc_per_node=N run.py ..., or "
                "hydra.launcher.gpus_per_node=N); one process trains unsharded: use trainer.strategy=ddp")
    from runners.engine.memplan import skeleton

    try:
        transformer_blocks(skeleton(task_cfg))
    except LookupError:  # the config is unreadable here: loading the model will say so, in one line
        return None
    except ValueError as err:
        return str(err)
    return None


def mean_and_any(loss: float, flag: bool, device: torch.device) -> tuple[float, bool]:
    """(loss averaged over ranks, whether any rank raised `flag`): every rank logs the global batch's
    loss and stops at the same step when one of them was signalled to (SLURM preemption)."""
    if _CURRENT.size == 1:
        return loss, flag
    both = torch.tensor([loss, float(flag)], dtype=torch.float64, device=device)
    dist.all_reduce(both)
    return float(both[0]) / _CURRENT.size, bool(both[1] > 0)
