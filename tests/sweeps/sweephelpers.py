"""Helpers for the sweep tests: tiny sweeps through `python run.py -m` as a user runs them."""
from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import slurm_cluster

from runners.engine.adapt import NOT_HP  # method config keys that are no hyper-parameters

ROOT = Path(__file__).resolve().parents[2]
# Tiny runs: 2 cores are shared with other work, so a sweep job must take seconds (one dataset, small
# splits). Budgets depend on the model only, so they are the real ones.
DATA = ["dataset=shapes", "task.data.train_size=200", "task.data.test_size=100", "trainer.batch_size=16"]
TINY = ["logger=none", "trainer.max_steps=4", "trainer.log_every=2", "trainer.timing_warmup=1",
        "trainer.checkpoint_every=2", *DATA]
# One thread per run: concurrent jobs on 2 shared cores otherwise spin against each other.
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# The test sweep: 2 methods x 2 budgets x 1 seed, no references.
SMALL_SWEEP = ["+sweep=budget", "task=clip", "sweep.methods=[lora,randlora]", "sweep.budgets=[lora4,lora8]",
               "sweep.seeds=[0]", "sweep.references=[]"]
# The test cluster has no GPU, 2 CPUs and little memory to spare.
SLURM = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.mem_gb=null", "hydra.launcher.timeout_min=60",
         f"hydra.launcher.partition={slurm_cluster.PARTITION}"]
# The runs SMALL_SWEEP expands to.
# (one dataset of the suite, so one job per method x budget, under the dataset's folder)
SMALL_SWEEP_RUNS = {"shapes/lora-lora4-s0", "shapes/lora-lora8-s0", "shapes/randlora-lora4-s0",
                    "shapes/randlora-lora8-s0"}
SWEEP_TIMEOUT = 600  # seconds for one whole tiny sweep

log = logging.getLogger(__name__)


def run_py(args: list[str], cwd: Path, timeout: float = SWEEP_TIMEOUT,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python run.py ARGS` as a user types it; output (stdout+stderr) in .stdout."""
    env = {**(env or os.environ), **THREADS}
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                            check=False)
    log.info("run.py %s -> %d\n%s", " ".join(args), result.returncode, result.stdout[-3000:])
    return result


def _job_files(sweep_dir: Path) -> dict[str, Path]:
    """Job name (`<dataset>/<method>-...-s<seed>`) -> its results.json, for every run of a sweep."""
    return {p.parent.relative_to(sweep_dir).as_posix(): p
            for p in sorted(Path(sweep_dir).glob("*/*/results.json"))}


def results(sweep_dir: Path) -> dict[str, dict]:
    """Job name -> results.json record of every run under a sweep directory."""
    return {name: json.loads(p.read_text()) for name, p in _job_files(sweep_dir).items()}


def mtimes(sweep_dir: Path) -> dict[str, int]:
    return {name: p.stat().st_mtime_ns for name, p in _job_files(sweep_dir).items()}


def assert_on_budget(record: dict) -> None:
    """Achieved adapter count within 2% of the target, or exactly the solver's nearest achievable count."""
    params, run = record["params"], record["run"]
    assert params["budget_target"], run["id"]
    if abs(params["budget_error"]) <= 0.02:
        return
    solution = solver_answer(run["config"], params["budget_target"])
    assert params["trainable"] == solution.achieved, (run["id"], params, solution.describe())
    near = [n[1] for n in (solution.nearest_below, solution.nearest_above) if n is not None]
    assert min(abs(n - solution.target) for n in near) == abs(solution.achieved - solution.target)


@functools.lru_cache(maxsize=4)
def _model_and_targets(task_json: str) -> tuple:
    from omegaconf import OmegaConf

    import tasks

    task = tasks.build(OmegaConf.create(json.loads(task_json)))
    return task.build_model(), task.target_modules


def solver_answer(config: dict, target: int):
    """What methods.solve_budget_report says for this run's model, method and fixed hyper-parameters."""
    from methods.budget import solve_budget_report

    model, targets = _model_and_targets(json.dumps(config["task"], sort_keys=True))
    fixed = {k: v for k, v in config["method"].items() if k not in NOT_HP}
    return solve_budget_report(model, config["method"]["name"], targets, target, **fixed)

def assert_small_sweep_succeeded(proc: subprocess.CompletedProcess, sweep_dir: Path) -> dict[str, dict]:
    """The small sweep exited 0 and wrote one successful, on-budget result per expected run."""
    assert proc.returncode == 0, proc.stdout[-3000:]
    records = results(sweep_dir)
    assert set(records) == SMALL_SWEEP_RUNS
    for record in records.values():
        assert record["run"]["status"] == "success", record["run"]["error"]
        assert_on_budget(record)
    return records
