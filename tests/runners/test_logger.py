"""W&B as a user sees it, offline (WANDB_MODE=offline): run names, a suite's group, the suite's summary
run."""
from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from runners.engine.suite import dataset_config
from runners.record.logger import (
    log_suite,
    offline_run_info,
    offline_summary,
    run_name,
    suite_group,
    wait_until_written,
)

WANDB = OmegaConf.create({"name": "wandb", "project": "rankbench", "entity": None, "group": None, "tags": [],
                          "mode": "offline"})


def _config(dataset: str | None, budget: str | None = "lora8", seed: int = 0) -> dict:
    return {"task": {"name": "clip"}, "method": {"name": "randlora"}, "dataset": dataset, "budget": budget,
            "seed": seed}


def test_run_names_differ_by_dataset_method_budget_and_seed():
    assert run_name(_config("eurosat")) == "eurosat-randlora-lora8-s0"
    assert run_name(_config(None, budget=None, seed=2)) == "clip-randlora-nobudget-s2"
    names = {run_name(_config(d, b, s)) for d in ("eurosat", "dtd") for b in ("lora8", None) for s in (0, 1)}
    assert len(names) == 8


def test_a_suite_s_runs_share_its_group(tmp_path):
    assert suite_group(WANDB, "clip-randlora-tiny-nobudget-s0-abc") == "clip-randlora-tiny-nobudget-s0-abc"
    assert suite_group(OmegaConf.merge(WANDB, {"group": "mine"}), "x") == "mine"
    assert suite_group(OmegaConf.create({"name": "none"}), "x") is None  # no W&B: configs unchanged
    cfg = OmegaConf.create({"logger": WANDB, "dataset": None, "out_dir": None})
    part = dataset_config(cfg, "dtd", tmp_path, suite_group(WANDB, "suite-id"))
    assert part.logger.group == "suite-id" and part.dataset == "dtd" and cfg.logger.group is None


def test_the_suite_mean_and_per_dataset_table_reach_a_run_of_the_group(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    record = {"run": {"id": "clip-randlora-tiny-nobudget-s0-abc", "method": "randlora", "task": "clip",
                      "size": "tiny", "status": "success", "config": _config(None, budget=None)},
              "params": {"trainable": 1234}, "cost": {"train_time_s": 3.5},
              "metrics": {"accuracy": 0.6, "accuracy_before": 0.4,
                          "per_dataset": {"dtd": 0.5, "eurosat": 0.7},
                          "per_dataset_before": {"dtd": 0.3, "eurosat": 0.5}}}
    log_suite(WANDB, tmp_path, record, failed=False)
    [path] = [wait_until_written(p) for p in tmp_path.glob("wandb/offline-run-*/run-*.wandb")]
    assert offline_run_info(path) == {"name": "clip-randlora-nobudget-s0-mean", "group": record["run"]["id"],
                                 "job_type": "suite"}
    summary = offline_summary(path)
    assert summary["metrics/accuracy"] == 0.6 and summary["run_id"] == record["run"]["id"]
    assert summary["per_dataset/_type"] == "table-file"  # offline_summary joins nested keys with "/"
    [table] = path.parent.glob("files/" + summary["per_dataset/path"])
    data = json.loads(table.read_text())
    assert data["columns"] == ["dataset", "accuracy_before", "accuracy"]
    assert data["data"] == [["dtd", 0.3, 0.5], ["eurosat", 0.5, 0.7], ["mean", 0.4, 0.6]]


def test_no_w_and_b_logs_no_suite_run(tmp_path):
    log_suite(OmegaConf.create({"name": "none"}), tmp_path, {"run": {"id": "x", "method": "m", "task": "t",
              "size": "tiny", "status": "success", "config": _config(None)}, "params": {}, "cost": {},
              "metrics": {"per_dataset": {}}}, failed=False)
    assert not list(tmp_path.iterdir())


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
