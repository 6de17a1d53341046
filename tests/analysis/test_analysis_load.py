"""Loading result files: tidy shape, skipping corrupt/partial files, keeping failed runs, W&B mapping."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from synthetic_results import BUDGETS, CLIP_DATASETS, make_record, write_record

from analysis.load import COLUMNS, ResultsError, load_results, load_wandb


def test_one_row_per_run_and_dataset(sweep_df):
    runs_per_task = 4 * 3 * 3 + 2 * 3
    clip = sweep_df[sweep_df.task == "clip"]
    # 1 failed clip run has no metrics: one row instead of one per dataset
    assert len(clip) == (runs_per_task - 1) * len(CLIP_DATASETS) + 1
    assert set(clip.dropna(subset=["accuracy"]).dataset) == set(CLIP_DATASETS)
    vision = sweep_df[sweep_df.task == "vision"]
    assert len(vision) == runs_per_task and set(vision.dataset) == {"digits"}
    assert list(sweep_df.columns) == COLUMNS


def test_fields_mapped(sweep_df):
    row = sweep_df[(sweep_df.method == "lora") & (sweep_df.budget_target == BUDGETS[0])
                   & (sweep_df.task == "clip") & (sweep_df.seed == 0) & (sweep_df.dataset == "dtd")].iloc[0]
    assert row.model == "tiny-clip" and row.regime == "16-shot" and row["size"] == "tiny"
    assert row.trainable_params == BUDGETS[0] + 1024
    assert row.peak_rss_bytes > 0 and row.peak_mem_bytes != row.peak_mem_bytes  # CPU run: NaN GPU column
    assert 0 < row.accuracy < 1 and row.accuracy_before == pytest.approx(0.25 + 0.3 / 5)
    assert row.dw_rank_frac == pytest.approx(4 / 64)
    assert row.command.startswith("python run.py method=lora task=clip")
    assert json.loads(row.versions)["torch"] == "2.13.0"


def test_corrupt_file_skipped_with_warning_naming_it(sweep_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="analysis.load"):
        df = load_results(sweep_dir)
    bad = str(sweep_dir / "2025-11-22" / "10-00-clip" / "999" / "nested" / "results.json")
    assert any(bad in rec.getMessage() for rec in caplog.records)
    assert [s["file"] for s in df.attrs["skipped"]] == [bad]
    assert bad not in set(df.source)


def test_partial_success_file_skipped(tmp_path, caplog):
    good = make_record("lora", "vision", 0, BUDGETS[0])
    partial = make_record("loha", "vision", 0, BUDGETS[0])
    partial["metrics"] = {}
    write_record(tmp_path / "a", good)
    path = write_record(tmp_path / "b", partial)
    with caplog.at_level(logging.WARNING):
        df = load_results([tmp_path])
    assert set(df.method) == {"lora"}
    assert str(path) in caplog.text and "partial" in caplog.text


def test_failed_run_kept_and_marked(sweep_df):
    failed = sweep_df[sweep_df.status == "failed"]
    assert len(failed) == 1
    assert failed.iloc[0].method == "lora" and "out of memory" in failed.iloc[0].error


def test_bad_inputs(tmp_path):
    with pytest.raises(ResultsError, match="no such file"):
        load_results(tmp_path / "missing")
    with pytest.raises(ResultsError, match="no results.json"):
        load_results(tmp_path)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "results.json").write_text("[1, 2]")
    with pytest.raises(ResultsError, match="no readable result files"):
        load_results(tmp_path)


def test_accepts_a_file_and_mixed_args(tmp_path):
    path = write_record(tmp_path / "r", make_record("none", "clip", 0, None))
    df = load_results([path, str(tmp_path)])
    assert df.source.nunique() == 1 and len(df) == len(CLIP_DATASETS)


class _FakeApi:
    """Stands in for wandb.Api(): `runs(path)` yields objects with config, summary, state, id."""

    def __init__(self, runs: list[SimpleNamespace]) -> None:
        self._runs = runs
        self.paths: list[str] = []

    def runs(self, path: str) -> list[SimpleNamespace]:
        self.paths.append(path)
        return self._runs


def _wandb_run(record: dict, flat: bool, state: str = "finished") -> SimpleNamespace:
    summary = {"params": record["params"], "cost": record["cost"], "metrics": record["metrics"],
               "_step": 150, "_runtime": 60.0}
    if flat:  # what wandb.log({"cost/step_time_s": ...}) produces
        summary = {f"{sec}/{k}": v for sec in ("params", "cost") for k, v in record[sec].items()}
        summary |= {f"metrics/per_dataset/{d}": a for d, a in record["metrics"]["per_dataset"].items()}
        summary |= {"metrics/accuracy": record["metrics"]["accuracy"],
                    "metrics/accuracy_before": record["metrics"]["accuracy_before"]}
    run = record["run"]
    return SimpleNamespace(id=run["id"], config=run["config"] | {"git_commit": run["git_commit"]},
                           summary=summary, state=state, created_at="2025-11-22T10:00:00")


@pytest.mark.parametrize("flat", [False, True])
def test_wandb_loader_maps_same_columns(flat):
    recs = [make_record("randlora", "clip", s, BUDGETS[1]) for s in (0, 1)]
    crashed = make_record("lora", "clip", 0, BUDGETS[1])
    api = _FakeApi([_wandb_run(r, flat) for r in recs] + [_wandb_run(crashed, flat, state="crashed")])
    df = load_wandb("me/rankbench", api=api)
    assert api.paths == ["me/rankbench"] and list(df.columns) == COLUMNS
    ok = df[df.status == "success"]
    assert set(ok.method) == {"randlora"} and set(ok.dataset) == set(CLIP_DATASETS)
    assert set(ok.budget_target) == {BUDGETS[1]} and ok.regime.iloc[0] == "16-shot"
    assert ok.peak_rss_bytes.notna().all() and ok.git_commit.iloc[0].startswith("0123")
    want = recs[0]["metrics"]["per_dataset"]["dtd"]
    assert ok[(ok.seed == 0) & (ok.dataset == "dtd")].accuracy.iloc[0] == pytest.approx(want)
    assert (df.status == "failed").sum() == len(CLIP_DATASETS)  # crashed run kept, marked


def test_unknown_paths_never_crash_on_missing_optional_fields(tmp_path: Path):
    rec = {"schema": 1, "run": {"method": "lora", "status": "success"}, "metrics": {"accuracy": 0.5}}
    write_record(tmp_path / "minimal", rec)
    df = load_results(tmp_path)
    assert len(df) == 1 and df.iloc[0].model == "?" and df.iloc[0].regime == "full data"
