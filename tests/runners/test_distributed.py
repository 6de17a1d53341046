"""Data-parallel runs (DDP) on the CPU with gloo: `torchrun --nproc_per_node=2 run.py ...` writes one
results.json, matches a single-process run of the same effective batch, and resumes after a kill."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rbtest import ROOT, compose_config

from runners.distributed import World, first_host, from_env
from runners.train import run

TORCHRUN = Path(sys.executable).with_name("torchrun")
ARGS = ["method=lora", "task=clip", "dataset=shapes", "trainer.max_steps=6", "trainer.batch_size=16",
        "task.data.train_size=64", "task.data.test_size=32", "logger=none", "threads=1", "trainer.log_every=1",
        "trainer.timing_warmup=1", "trainer.checkpoint_every=2"]
KILL_IN_STEP = 3  # both ranks die in step 3; the checkpoint of step 2 is where the rerun resumes

# run.py with every rank killed (SIGKILL, like a node lost) in its optimizer step KILL_IN_STEP
DYING_RUN = f"""
import os, runpy, signal, sys
sys.path.insert(0, {str(ROOT)!r})
import runners.train as train
real, calls = train._optimizer_step, [0]
def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] == {KILL_IN_STEP}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
train._optimizer_step = dying
sys.argv[0] = {str(ROOT / "run.py")!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("env, world, master", [
    ({}, World(), {}),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, World(1, 2, 1), {}),  # torchrun sets the master
    ({"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
      "SLURM_STEP_NODELIST": "gpu[07-08]"}, World(3, 4, 1), {"MASTER_ADDR": "gpu07", "MASTER_PORT": "23456"}),
    ({"SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1",
      "SUBMITIT_LOCAL_JOB_ID": "4242"}, World(1, 2, 1), {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "24242"}),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, World(), {}),  # an allocation, not an srun step: one process
])
def test_world_comes_from_the_launcher(env, world, master):
    assert from_env(env) == (world, master)


@pytest.mark.parametrize("nodelist, host", [("node1", "node1"), ("gpu[07-09,12],cpu1", "gpu07"),
                                            ("a-b[3,5]", "a-b3"), ("c1,c2", "c1")])
def test_first_host_of_a_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


def torchrun(script: Path, out: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(script), *ARGS, f"out_dir={out}",
           f"hydra.run.dir={cwd / 'hydra'}"]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow
def test_ddp_run_resumes_after_a_kill_and_matches_one_process(tmp_path):
    out = tmp_path / "ddp"
    dying = tmp_path / "dying_run.py"
    dying.write_text(DYING_RUN)
    killed = torchrun(dying, out, tmp_path)
    assert killed.returncode != 0 and (out / "checkpoint.pt").exists() and not (out / "results.json").exists()

    resumed = torchrun(ROOT / "run.py", out, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {KILL_IN_STEP - 1}" in resumed.stderr  # resumed, not restarted
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("results.json")] == [Path("ddp/results.json")]
    ddp = json.loads((out / "results.json").read_text())
    assert ddp["run"]["status"] == "success" and ddp["run"]["world_size"] == 2
    assert not (out / "checkpoint.pt").exists()

    single = run(compose_config([*ARGS, f"out_dir={tmp_path / 'single'}"]))  # batch 16 = 2 ranks x 8
    assert single["run"]["world_size"] == 1
    assert [h["step"] for h in ddp["history"]] == [h["step"] for h in single["history"]]
    assert [h["loss"] for h in ddp["history"]] == pytest.approx([h["loss"] for h in single["history"]], rel=1e-5)
    assert ddp["metrics"]["per_dataset"] == pytest.approx(single["metrics"]["per_dataset"], abs=1e-9)


def test_a_batch_that_does_not_split_over_the_processes_is_refused_before_anything_starts(tmp_path, monkeypatch):
    from runners.train import RunFailed

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc_per_node=2 sets it
    with pytest.raises(RunFailed, match=r"^trainer.batch_size=15 is not divisible by the 2 processes of this run; "
                                        r"use a multiple of 2"):
        run(compose_config([*ARGS, "trainer.batch_size=15", f"out_dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "run").exists()
