"""A small real sweep -> the report: every runs.csv row is its run's results.json, read, not recomputed."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pandas as pd
import pytest

from analysis.report import main
from runners.record.schema import Cost

ROOT = Path(__file__).resolve().parents[2]
# 2 methods x 1 budget x 1 seed on one dataset of the tiny CLIP suite, a few steps each: seconds per job.
SWEEP = ["-m", "+sweep=budget", "task=clip", "sweep.methods=[lora,randlora]", "sweep.budgets=[lora4]",
         "sweep.seeds=[0]", "sweep.references=[]", "dataset=shapes", "logger=none", "trainer.max_steps=4",
         "trainer.log_every=2", "trainer.timing_warmup=1", "trainer.checkpoint_every=0",
         "task.data.train_size=64", "task.data.test_size=32", "trainer.batch_size=16"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, dict], pd.DataFrame]:
    """(results.json records by run id, report/runs.csv) of the sweep, run as a user runs it."""
    root = tmp_path_factory.mktemp("sweep")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "run.py"), *SWEEP, f"sweep.root={root / 'multirun'}"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted((root / "multirun").rglob("results.json"))]
    assert main([str(root / "multirun"), "--out", str(root / "report"), "--dpi", "40", "-q"]) == 0
    return {r["run"]["id"]: r for r in records}, pd.read_csv(root / "report" / "runs.csv")


def _same(csv_value: object, json_value: object) -> bool:
    if json_value is None:
        return pd.isna(csv_value)
    if isinstance(json_value, float):
        return math.isclose(float(csv_value), json_value, rel_tol=1e-12)
    return csv_value == json_value


@pytest.mark.slow
def test_every_runs_csv_row_equals_its_results_json(sweep):
    records, runs = sweep
    assert sorted(runs["run_id"]) == sorted(records) and len(records) == 2
    for _, row in runs.iterrows():
        r = records[row["run_id"]]
        run, params, metrics = r["run"], r["params"], r["metrics"]
        expected = {"method": run["method"], "method_kind": run["method_kind"],
                    "budget": run["budget_target"], "seed": run["seed"], "lr": run["lr"],
                    "accuracy": metrics["accuracy"],
                    "accuracy_before": metrics["accuracy_before"], "eval_split": metrics["eval_split"],
                    "trainable": params["trainable"], "head_trainable": params["head_trainable"],
                    "total": params["total"], "budget_error": params["budget_error"],
                    "budget_reached": params["budget_reached"],
                    "adapter_file_bytes": params["adapter_file_bytes"],
                    **{f.name: r["cost"].get(f.name) for f in fields(Cost)}}  # absent: not measured
        wrong = {k: (row[k], v) for k, v in expected.items() if not _same(row[k], v)}
        assert not wrong, f"{row['run_id']}: runs.csv vs results.json {wrong}"
        assert row["step_time_s"] > 0 and row["peak_rss_bytes"] > 0  # the figures were measured


@pytest.mark.slow
def test_the_report_shows_the_lr_each_run_used_not_trainer_lr(sweep):
    """The issue's bug: the tiny CLIP's trainer.lr is 5e-3, RandLoRA trains at its own 1e-3 (run.lr)."""
    records, runs = sweep
    lr = {run["run"]["method"]: (run["run"]["lr"], run["run"]["config"]["trainer"]["lr"])
          for run in records.values()}
    used, trainer = lr["randlora"]
    assert used != trainer  # otherwise this test could not tell them apart
    assert runs.set_index("method").loc["randlora", "lr"] == used == 1e-3
    assert runs.set_index("method").loc["lora", "lr"] == lr["lora"][0]
