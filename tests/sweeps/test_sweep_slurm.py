"""Sweeps through `hydra/launcher=slurm` on a real single-node SLURM cluster started by the `slurm`
fixture."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sweephelpers import (
    DATA,
    ROOT,
    SLURM,
    SMALL_SWEEP,
    SMALL_SWEEP_RUNS,
    SWEEP_TIMEOUT,
    THREADS,
    TINY,
    assert_small_sweep_succeeded,
    mtimes,
    results,
    run_py,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]



def job_dirs(sweep_dir: Path) -> set[str]:
    """SLURM job ids submitit used in this sweep dir (one folder per job or array task)."""
    return {p.parent.name for p in (sweep_dir / ".submitit").glob("*/*_log.out")}


def test_slurm_sweep_skips_finished_runs_and_reruns_a_deleted_one(slurm, tmp_path):
    env = {**os.environ, **slurm.env}
    sweep = ["-m", *SMALL_SWEEP, *TINY, *SLURM, f"sweep.root={tmp_path / 'multirun'}"]
    sweep_dir = tmp_path / "multirun" / "budget" / "clip-tiny"

    assert_small_sweep_succeeded(run_py(sweep, cwd=tmp_path, env=env), sweep_dir)
    jobs, before = job_dirs(sweep_dir), mtimes(sweep_dir)
    assert len(jobs) == 4

    again = run_py(sweep, cwd=tmp_path, env=env)
    assert again.returncode == 0 and "nothing to launch" in again.stdout
    assert job_dirs(sweep_dir) == jobs and mtimes(sweep_dir) == before

    (sweep_dir / "shapes" / "lora-lora8-s0" / "results.json").unlink()
    third = run_py(sweep, cwd=tmp_path, env=env)
    assert third.returncode == 0 and "launching 1" in third.stdout
    assert len(job_dirs(sweep_dir) - jobs) == 1
    after = mtimes(sweep_dir)
    assert {k for k in SMALL_SWEEP_RUNS if after[k] != before[k]} == {"shapes/lora-lora8-s0"}


# --- preemption -----------------------------------------------------------------------------------

PREEMPT_STEPS = 150  # long enough (seconds) that USR2 lands mid-training after the first checkpoint
ONE_RUN = ["+sweep=budget", "task=clip", "sweep.methods=[lora]", "sweep.budgets=[lora4]", "sweep.seeds=[0]",
           "sweep.references=[]", "logger=none", f"trainer.max_steps={PREEMPT_STEPS}", "trainer.log_every=5",
           "trainer.timing_warmup=1", "trainer.checkpoint_every=5", *DATA, *SLURM]


def start_sweep(root: Path, env: dict[str, str]) -> subprocess.Popen:
    """The one-run sweep in the background; its output goes to <root>.log."""
    with open(root.parent / f"{root.name}.log", "w") as out:
        return subprocess.Popen([sys.executable, str(ROOT / "run.py"), "-m", *ONE_RUN, f"sweep.root={root}"],
                                cwd=root.parent, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def finish(proc: subprocess.Popen, root: Path, timeout: float) -> str:
    """Wait for a background sweep (killing it on time-out) and return its output."""
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return (root.parent / f"{root.name}.log").read_text()


def comparable(record: dict) -> dict:
    return {"metrics": {k: record["metrics"][k] for k in ("accuracy", "per_dataset", "delta_rank")},
            "loss": [(h["step"], h["loss"], h["lr"]) for h in record["history"]],
            "trainable": record["params"]["trainable"], "hp": record["run"]["hp"]}


def test_preempted_slurm_job_requeues_and_resumes_to_identical_metrics(slurm, tmp_path):
    env = {**os.environ, **slurm.env, **THREADS}
    run_dirs = {name: tmp_path / name / "budget" / "clip-tiny" / "shapes" / "lora-lora4-s0"
                for name in ("plain", "preempted")}
    procs = {name: start_sweep(tmp_path / name, env) for name in run_dirs}
    try:
        wait_for(lambda: (run_dirs["preempted"] / "checkpoint.pt").exists(), SWEEP_TIMEOUT,
                 "the first checkpoint of the run to preempt")
        job = next(iter(job_dirs(run_dirs["preempted"].parents[1])))
        subprocess.run(["scancel", "--signal=USR2", job], env=env, check=True, timeout=30)
        outputs = {name: finish(proc, tmp_path / name, SWEEP_TIMEOUT) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    for name, proc in procs.items():
        assert proc.returncode == 0, outputs[name][-3000:]

    submitit_dir = run_dirs["preempted"].parents[1] / ".submitit"
    submitit_logs = "".join(p.read_text() for p in submitit_dir.rglob("*_log.*"))
    assert "this job is preempted" in submitit_logs, "USR2 arrived after the run ended; raise PREEMPT_STEPS"
    assert "Requeued" in submitit_logs or "requeue" in submitit_logs.lower()
    assert "resuming from" in submitit_logs + (run_dirs["preempted"] / "run.log").read_text()

    plain = results(run_dirs["plain"].parents[1])["shapes/lora-lora4-s0"]
    preempted = results(run_dirs["preempted"].parents[1])["shapes/lora-lora4-s0"]
    assert preempted["run"]["status"] == plain["run"]["status"] == "success"
    assert comparable(preempted) == comparable(plain)
