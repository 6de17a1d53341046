"""+sweep=paper: each task's published comparison at the official scripts' ranks and seeds, no budget."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from sweephelpers import run_py

from runners.engine.suite import sweep_datasets
from runners.sweeps.sweeper import SweepError, expand, select_grid

CONF = Path(__file__).resolve().parents[2] / "conf"

# (task, size) -> jobs per seed per dataset, and seeds: the official scripts' grids (conf/sweep/paper.yaml)
GRIDS = {("clip", "base"): (["full", "lora-r32", "randlora-r6-seed1", "vera-r256"], [1]),
         ("language", "base"): (["lora-r4", "randlora-r64", "vera-r256"], [1, 2, 3, 4, 5]),
         ("language", "large"): (["lora-r4", "randlora-r100", "vera-r256"], [1, 2, 3, 4, 5]),
         ("commonsense", "large"): (["lora-r32", "randlora-r30-seed63098"], [63098])}


def sweep_config(name: str, *overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"+sweep={name}", *overrides], return_hydra_config=True)


def paper_jobs(task: str, size: str, *overrides: str):
    cfg = sweep_config("paper", f"task={task}", f"size={size}", *overrides)
    spec = select_grid(OmegaConf.to_container(cfg.sweep, resolve=True), task, size)
    return cfg, expand({**spec, "datasets": sweep_datasets(cfg)})


@pytest.mark.parametrize("task, size", list(GRIDS))
def test_paper_sweep_runs_the_published_grid(task, size):
    cfg, jobs = paper_jobs(task, size)
    runs, seeds = GRIDS[(task, size)]
    datasets = sweep_datasets(cfg)
    assert len(jobs) == len(runs) * len(seeds) * max(1, len(datasets))
    names = {j.name.rsplit("/", 1)[-1].rsplit("-s", 1)[0] for j in jobs}
    assert names == set(runs)
    assert all("budget=null" in j.overrides for j in jobs)
    assert {int(o.split("=")[1]) for j in jobs for o in j.overrides if o.startswith("seed=")} == set(seeds)
    assert cfg.sweep.name == "paper" and cfg.task.scaling == "official"
    if datasets:   # per-dataset suites train on the whole train split, as the official scripts
        assert cfg.task.data.val_fraction == 0


def test_paper_sweep_jobs_run_the_official_scaling():
    """A paper job's composed method: the ranks above with the official alpha (conf/task/*/base.yaml)."""
    cfg = sweep_config("paper", "task=clip", "size=base", "method=randlora", "++method.r=6")
    assert (cfg.method.r, cfg.method.alpha, cfg.method.init) == (6, 1, "official")
    cfg = sweep_config("paper", "task=language", "size=large", "method=randlora", "++method.r=100")
    assert (cfg.method.alpha, cfg.method.sqrt_n) == (200, True)


def test_a_task_without_a_published_comparison_is_one_line():
    spec = OmegaConf.to_container(sweep_config("paper").sweep, resolve=True)
    with pytest.raises(SweepError,
                       match="no published comparison for task=clip size=tiny; it has: task=clip size=base"):
        select_grid(spec, "clip", "tiny")
    narrowed = select_grid({**spec, "methods": ["lora"]}, "language", "base")
    assert narrowed["methods"] == ["lora"] and narrowed["seeds"] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_paper_sweep_dry_run_lists_the_jobs(tmp_path):
    proc = run_py(["-m", "+sweep=paper", "task=language", "size=base", "sweep.dry_run=true", "threads=1",
                   f"sweep.root={tmp_path / 'multirun'}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "sweep paper: dry run, 90 of 90 runs would launch" in proc.stdout
    assert "rte/randlora-r64-s3 -> " in proc.stdout
    tiny = run_py(["-m", "+sweep=paper", "sweep.dry_run=true"], cwd=tmp_path)
    assert tiny.returncode != 0 and "no published comparison for task=clip size=tiny" in tiny.stdout
