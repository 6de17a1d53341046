"""A run's config composed and checked: every problem said in one line before anything is built.

`run.py` composes the config once with Hydra's compose API before handing over to `@hydra.main`, so a
typo such as `task=clpi` or `trainer.max_step=5`, or a value no run can use such as `trainer.lr=-1`,
ends with one line naming what is wrong and what is valid, before anything is built or trained.
"""
from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def command_line_problem(argv: list[str]) -> str | None:
    """Return a one-line error for a command line whose config cannot be composed, else None."""
    if any(a.startswith(("--hydra-help", "--help", "-h")) for a in argv):
        return None  # help needs no config
    overrides = [a for a in argv if not a.startswith("-") and "=" in a]
    if any(a in ("-m", "--multirun") for a in argv):
        overrides = _without_sweeps(overrides)  # the sweeper validates the sweep itself
    try:
        import methods  # noqa: F401  (registers conf/method/*.yaml, each peft block checked)
    except ValueError as err:
        return str(err).splitlines()[0]
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        return check_values(cfg)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        return one_line(str(err))


# ----------------------------------------------------------------------------- composed values
def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _positive_int(v: Any) -> bool:
    return _is_int(v) and v >= 1


def _count(v: Any) -> bool:
    return _is_int(v) and v >= 0


def _positive(v: Any) -> bool:
    return _is_number(v) and v > 0


def _non_negative(v: Any) -> bool:
    return _is_number(v) and v >= 0


def _fraction(v: Any) -> bool:
    return _is_number(v) and 0 <= v <= 1


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _budget(v: Any) -> bool:
    """A budget methods.resolve_budget understands: a parameter count, "loraN" or "native"."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    text = v.strip().lower() if isinstance(v, str) else None
    if text is not None and (text.isdigit() or re.fullmatch(r"lora\d+", text)):
        return int(text.removeprefix("lora")) > 0
    return text == "native" or _positive_int(v)


#: (key, check, what is valid). Only values that need no model: whether a budget is reachable or a rank
#: fits a layer depends on the model's shapes, and `methods` refuses those before allocating anything.
VALUE_CHECKS: list[tuple[str, Callable[[Any], bool], str]] = [
    ("seed", _is_int, "use an integer, e.g. seed=0"),
    ("budget", _optional(_budget), ("use a parameter count, loraN (LoRA rank N's count, e.g. lora8), native "
                                    "(each method's configured hyper-parameters, unsolved) or null")),
    ("device", lambda v: v in ("auto", "cpu", "cuda"), "use auto, cpu or cuda"),
    ("threads", _optional(_positive_int), "use an integer >= 1, or null for one per core"),
    ("trainer.lr", _positive, "use a number > 0, e.g. trainer.lr=1e-3"),
    ("method.lr", _optional(_positive), "use a number > 0, or null for the task's default"),
    ("trainer.batch_size", _positive_int, "use an integer >= 1"),
    ("trainer.eval_batch_size", _positive_int, "use an integer >= 1"),
    ("trainer.grad_accum", _positive_int, "use an integer >= 1 (1: an optimizer step every micro-batch)"),
    ("trainer.max_steps", _optional(_count),
     "use an integer >= 0 (0: evaluate only), or null for the task's configured epochs"),
    ("trainer.warmup_steps", _count, "use an integer >= 0"),
    ("trainer.warmup_ratio", _optional(_fraction), "use a number in [0, 1], or null"),
    ("trainer.final_lr_ratio", _fraction, "use a number in [0, 1]"),
    ("trainer.weight_decay", _non_negative, "use a number >= 0"),
    ("trainer.grad_clip", _optional(_non_negative), "use a number >= 0 (0 or null: off)"),
    ("trainer.timing_warmup", _count, "use an integer >= 0"),
    ("trainer.compile", lambda v: isinstance(v, bool), "use true or false"),
    ("trainer.log_every", _positive_int, "use an integer >= 1"),
    ("trainer.checkpoint_every", _optional(_count), "use an integer >= 0 (0: never)"),
    ("trainer.num_workers", lambda v: v == "auto" or _count(v),
     "use auto (the job's CPUs less one; 0 for in-memory data) or an integer >= 0"),
    ("task.model.dtype", lambda v: v in (None, "float32", "bfloat16"),
     "use float32, bfloat16 or null (float16 weights need loss scaling, which the training loop does not "
     "do)"),
    ("task.data.eval_split", lambda v: v in ("test", "validation"),
     "use test (the reported split) or validation (the split hyper-parameters are chosen on)"),
    ("task.data.val_fraction", lambda v: _is_number(v) and 0 <= v < 1,
     "use a number in [0, 1): the share of train held out for validation (0: none)"),
    ("task.data.val_max", _positive_int, "use an integer >= 1: the most examples held out for validation"),
    ("task.data.val_seed", _is_int, "use an integer, e.g. task.data.val_seed=0"),
    ("trainer.on_bad_checkpoint", lambda v: v in ("restart", "stop"),
     "use restart (move the unreadable file aside and train from the start) or stop"),
    ("trainer.strategy", lambda v: v in ("ddp", "fsdp"), "use ddp (replicas) or fsdp (sharded, FSDP2)"),
    ("plan.gpu_memory_gb", _optional(_positive),
     "use the GiB of one GPU (a number > 0), or null for this node's"),
    ("plan.allowance_gb", _non_negative, "use a number of GiB >= 0"),
    ("plan.over", lambda v: v in ("refuse", "skip"),
     "use refuse (stop the sweep) or skip (launch the jobs that fit)"),
    ("sweep.lr_factors",
     lambda v: isinstance(v, (list, ListConfig)) and len(v) > 0 and all(_positive(x) for x in v),
     "use a non-empty list of numbers > 0, e.g. sweep.lr_factors=[0.25,0.5,1,2,4]"),
]

_ABSENT = object()


def check_values(cfg: DictConfig) -> str | None:
    """One line naming the first composed value no run can use and what is valid, else None.

    Type and range errors otherwise surface deep inside a run (`seed=abc`: "not all arguments converted
    during string formatting"), or not at all (`trainer.grad_accum=0` trains nothing and reports success).
    """
    for key, check, valid in VALUE_CHECKS:
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT and not check(value):
            return f"{key}={value} is not valid: {valid}"
    for name, value in (OmegaConf.select(cfg, "trainer.method_lr", default=None) or {}).items():
        if not _positive(value):
            return f"trainer.method_lr.{name}={value} is not valid: use a number > 0"
    return check_dataset(cfg)


def check_dataset(cfg: DictConfig) -> str | None:
    """`dataset=` must name a dataset of the task's suite (or be null: the whole suite)."""
    wanted, suite = cfg.get("dataset"), OmegaConf.select(cfg, "task.data.datasets", default=None)
    if wanted is None or suite is None or str(wanted) in [str(n) for n in suite]:
        return None
    return (f"dataset={wanted} is not valid: task {cfg.task.name} "
            f"(size={OmegaConf.select(cfg, 'size.name')}) has {', '.join(str(n) for n in suite)}; "
            "name one of them, or null for the whole suite")


def compose_config(overrides: list[str]) -> DictConfig:
    """The job config `python run.py <overrides>` would run with (no Hydra run directory needed);
    a composition error exits with the same one line as run.py."""
    if (problem := command_line_problem(overrides)) is not None:
        raise SystemExit(f"rankbench: {problem}")
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def one_line(message: str) -> str:
    """Condense a Hydra/OmegaConf error message to the part a user needs."""
    missing = re.search(r"Could not find '([^']+)/([^']+)'", message)
    if missing:
        group, choice = missing.groups()
        options = _options(group)
        return f"unknown {group} {choice!r}; valid: {', '.join(options) or '(none found)'}"
    override = re.search(r"Could not override '([^']+)'", message)
    if override:
        key = override.group(1)
        return (f"unknown config key {key!r} (check the spelling; `python run.py --cfg job` lists every key; "
                f"use +{key}=... only to add a new key)")
    first = next((line.strip() for line in message.splitlines() if line.strip()), message)
    return f"invalid command line: {first}"


def _without_sweeps(overrides: list[str]) -> list[str]:
    """Drop `key=a,b` style sweep values: compose checks one job's config, not the product."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return overrides  # let compose report the syntax error
    return [o.input_line for o in parsed if not o.is_sweep_override()]


def visible_gpus() -> int:
    """GPUs this process may use (CUDA_VISIBLE_DEVICES respected; 0 without CUDA), for launchers that must
    hand them on: submitit's local executor gives a job `gpus_per_node` GPUs and hides the rest."""
    import torch  # here, not at import: the command-line check stays fast

    return torch.cuda.device_count()


# `${rankbench.gpus:}` in conf/hydra/launcher/local.yaml; registered wherever run.py or a run is imported.
OmegaConf.register_new_resolver("rankbench.gpus", visible_gpus, replace=True)


def tasks_per_node(gpus: int | None) -> int:
    """One process per GPU (DDP); one for a CPU-only job (`gpus_per_node: null` or 0)."""
    return max(1, int(gpus or 0))


# `${rankbench.tasks_per_node:${.gpus_per_node}}` in conf/hydra/launcher/slurm.yaml.
OmegaConf.register_new_resolver("rankbench.tasks_per_node", tasks_per_node, replace=True)


def _options(group: str) -> list[str]:
    """Choices of a config group, including those plugins provide (e.g. hydra/launcher=submitit_local)."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return sorted(GlobalHydra.instance().config_loader().get_group_options(group))
