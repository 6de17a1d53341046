"""Tiny real sweeps on this machine (basic and submitit_local launchers) and bad command lines."""
from __future__ import annotations

import os

import pytest
from sweephelpers import (
    SMALL_SWEEP,
    SMALL_SWEEP_RUNS,
    TINY,
    assert_small_sweep_succeeded,
    mtimes,
    run_py,
)

from runners.sweeps.sweeper import registered_methods


@pytest.mark.parametrize("args, line", [
    (["+sweep=bugdet"], "rankbench: unknown sweep 'bugdet'; valid: budget, lr, paper, ranks, tuned"),
    (["+sweep=budget", "sweep.methods=[lora,lroa]"],
     "rankbench: unknown method 'lroa' in sweep.methods; valid: " + ", ".join(registered_methods()[0])),
    (["+sweep=budget", "hydra/launcher=ray"], "rankbench: unknown hydra/launcher 'ray'; valid: basic, "),
    (["+sweep=budget", "method=lora"], "rankbench: method= is set per run by +sweep=budget"),
    pytest.param(["+sweep=budget", "hydra/launcher=slurm", "sweep.preflight=false", "sweep.methods=[lora]",
                  "sweep.budgets=[lora8]", "sweep.seeds=[0]", "sweep.references=[]", "dataset=shapes"],
                 "rankbench: hydra.launcher.constraint is null, so SLURM may run this sweep's jobs on "
                 "different GPU types", marks=pytest.mark.slow),
])
def test_bad_sweep_command_is_one_clear_line(args, line, tmp_path):
    result = run_py(["-m", *args, f"sweep.root={tmp_path}"], cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    errors = [ln for ln in result.stdout.splitlines() if ln.startswith("rankbench:")]
    assert len(errors) == 1 and errors[0].startswith(line), result.stdout[-2000:]
    assert "Traceback" not in result.stdout
    assert not list(tmp_path.rglob("results.json"))


def test_a_slurm_sweep_runs_the_preflight_before_submitting(tmp_path):
    """Problems of the suite stop the sweep on the submitting machine, in one line, before any job."""
    result = run_py(["-m", "+sweep=budget", "task=clip", "size=base", "hydra/launcher=slurm",
                     "sweep.methods=[lora]", "sweep.budgets=[lora8]", "sweep.seeds=[0]",
                     "sweep.references=[]", "task.data.datasets=[cars,ucf101]", f"sweep.root={tmp_path}"],
                    cwd=tmp_path, timeout=120,
                    env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    errors = [ln for ln in result.stdout.splitlines() if ln.startswith("rankbench:")]
    assert len(errors) == 1, result.stdout[-3000:]
    assert "preflight found 3 problem(s) before submitting" in errors[0], result.stdout[-3000:]
    assert "set task.data.sources.ucf101.path" in result.stdout and "Traceback" not in result.stdout
    assert not list(tmp_path.rglob("results.json")) and not list(tmp_path.rglob(".submitit"))


@pytest.mark.slow
def test_basic_launcher_sweep_skips_finished_runs_and_reruns_a_deleted_one(tmp_path):
    sweep = ["-m", *SMALL_SWEEP, *TINY, f"sweep.root={tmp_path / 'multirun'}"]
    sweep_dir = tmp_path / "multirun" / "budget" / "clip-tiny"

    records = assert_small_sweep_succeeded(run_py(sweep, cwd=tmp_path), sweep_dir)
    for record in records.values():
        assert record["run"]["config"]["logger"]["group"] == "budget-clip-tiny"
    before = mtimes(sweep_dir)

    again = run_py(sweep, cwd=tmp_path)
    assert again.returncode == 0 and "all 4 runs already finished; nothing to launch" in again.stdout
    assert again.stdout.count("skip ") == 4 and mtimes(sweep_dir) == before

    (sweep_dir / "shapes" / "randlora-lora8-s0" / "results.json").unlink()
    third = run_py(sweep, cwd=tmp_path)
    assert third.returncode == 0 and "4 runs, 3 finished, launching 1" in third.stdout
    after = mtimes(sweep_dir)
    assert set(after) == SMALL_SWEEP_RUNS
    assert {k for k in SMALL_SWEEP_RUNS if after[k] != before.get(k)} == {"shapes/randlora-lora8-s0"}

    changed = run_py([*sweep, "trainer.max_steps=5"], cwd=tmp_path)
    assert changed.returncode != 0
    assert "holds a finished run of a different config (trainer.max_steps: 4 -> 5)" in changed.stdout


@pytest.mark.slow
def test_submitit_local_sweep_runs_each_job_in_its_own_process(tmp_path):
    sweep = ["-m", *SMALL_SWEEP, *TINY, "hydra/launcher=submitit_local",
             f"sweep.root={tmp_path / 'multirun'}"]
    sweep_dir = tmp_path / "multirun" / "budget" / "clip-tiny"

    assert_small_sweep_succeeded(run_py(sweep, cwd=tmp_path), sweep_dir)
    assert len(list((sweep_dir / ".submitit").glob("*/*_log.out"))) == 4  # one process per job

    again = run_py(sweep, cwd=tmp_path)
    assert again.returncode == 0 and "nothing to launch" in again.stdout
    assert len(list((sweep_dir / ".submitit").glob("*/*_log.out"))) == 4
