"""What a sweep checks on the submitting machine before it queues any job.

The suite's data and model (runners/sweeps/launch_check.py, the checks `python -m runners.preflight`
prints), the (method, budget) pairs a method's structure cannot reach on the task's model, and a SLURM
array that could spread over GPU types whose costs do not compare. `sweep.preflight` (true, false, or auto
= on the SLURM launcher) decides whether the launch check runs.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, open_dict

from runners.sweeps.launch_check import check_model, check_suite, model_table, problems, table

log = logging.getLogger(__name__)


def unreachable_pairs(config: DictConfig, spec: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(method, budget) pairs whose structure cannot reach the budget on this task's model (VeRA's r + out
    per layer stays below lora1; LoKr's largest count on 128-wide layers is below lora32), from the
    launch check's meta-device count; each gets one log line and is not launched. Empty when the model's
    shapes cannot be read here (every pair launches; those runs then fail naming the reachable range)."""
    budgets = [str(b) for b in spec.get("budgets") or [] if b is not None]
    if not budgets or not spec.get("methods"):
        return []
    model = check_model(config, budgets, list(spec["methods"]))
    if model["problems"]:
        log.warning("sweep %s: could not check which budgets each method reaches (%s)", spec.get("name"),
                    model["problems"][0])
        return []
    pairs = [(m, b, v["problem"]) for m, per in model["counts"].items() for b, v in per.items()
             if "problem" in v]
    for method, budget, why in pairs:
        log.warning("sweep %s: not launching %s at budget %s: %s", spec.get("name"), method, budget, why)
    return [(m, b) for m, b, _ in pairs]


def launch_problems(config: DictConfig, spec: Mapping[str, Any]) -> list[str]:
    """Problems the launch check (what `python -m runners.preflight` prints) finds for this sweep's task,
    when `sweep.preflight` asks for it (true, or auto = on the SLURM launcher); the full table is logged.
    Empty when skipped or clean."""
    mode = str(spec.get("preflight", "auto")).lower()
    if mode == "false" or (mode == "auto" and not _is_slurm(config)):
        return []
    job = config.copy()
    with open_dict(job):
        job.pop("hydra", None)
    records = check_suite(job, [str(b) for b in spec.get("budgets") or []] or None)
    log.info("preflight of sweep %s:\n%s\n%s", spec.get("name"), table(records),
             model_table(records[0].model) if records else "")
    return problems(records)


def _is_slurm(config: DictConfig) -> bool:
    return str(config.hydra.launcher.get("_target_", "")).endswith("SlurmLauncher")


def mixed_gpu_problem(launcher: DictConfig) -> str | None:
    """Why this launcher may spread one sweep over GPU types (None when it cannot): a SLURM array with
    GPUs and no `--constraint` runs wherever a GPU is free, and step times or memory measured on an A100
    and an H100 do not compare. Opting in (hydra.sweeper.mixed_gpu_types=true) keeps them apart in the
    report by the recorded device type."""
    target = str(launcher.get("_target_", ""))
    if (not target.endswith("SlurmLauncher") or not launcher.get("gpus_per_node")
            or launcher.get("constraint")):
        return None
    return ("hydra.launcher.constraint is null, so SLURM may run this sweep's jobs on different GPU types, "
            "whose step times and memory do not compare; set hydra.launcher.constraint=<your cluster's GPU "
            "feature> (`sinfo -o '%N %f'` lists them), or accept mixed types with "
            "hydra.sweeper.mixed_gpu_types=true")
