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
    with pytest.raises(ResultsError, match=r"no results\.json"):
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


def test_wandb_loader_leaves_out_a_suite_s_summary_run():
    parts = [make_record("lora", "clip", 0, BUDGETS[1])]
    summary = SimpleNamespace(**vars(_wandb_run(parts[0], flat=True)), job_type="suite")
    df = load_wandb("me/rankbench", api=_FakeApi([_wandb_run(parts[0], flat=True), summary]))
    assert len(df) == len(CLIP_DATASETS)  # each dataset once, not again from the suite's mean run


def test_unknown_paths_never_crash_on_missing_optional_fields(tmp_path: Path):
    rec = {"schema": 1, "run": {"method": "lora", "status": "success"}, "metrics": {"accuracy": 0.5}}
    write_record(tmp_path / "minimal", rec)
    df = load_results(tmp_path)
    assert len(df) == 1 and df.iloc[0].model == "?" and df.iloc[0].regime == "full data"


# ------------------------------------------------------ read through runners.record.schema, never guessed


def _v2(method: str = "lora", **metrics) -> dict:
    from runners.record.schema import Record, Run

    record = Record(run=Run(method=method, method_kind="adapter", method_label="LoRA", task="language",
                            size="base", model="FacebookAI/roberta-base", regime="frac0.5", lr=4e-4, seed=0,
                            model_revision="e2da8e2f811d1448a5b465c236feacd80ffbac7b"))
    for key, value in metrics.items():
        setattr(record.metrics, key, value)
    return record.to_dict()


def test_schema_2_fields_become_columns_as_recorded(tmp_path):
    glue = {"cola": {"accuracy": 0.8, "matthews_correlation": 0.55},
            "stsb": {"pearson": 0.9, "spearmanr": 0.88}}
    write_record(tmp_path / "r", _v2(accuracy=0.85, per_dataset={"cola": 0.55, "stsb": 0.9},
                                     per_dataset_metrics=glue, eval_split="test"))
    df = load_results(tmp_path).set_index("dataset")
    assert set(df.lr) == {4e-4} and set(df.regime) == {"50% data"} and set(df.model) == {"roberta-base"}
    assert set(df.model_revision) == {"e2da8e2f811d1448a5b465c236feacd80ffbac7b"}
    assert set(df.eval_split) == {"test"}
    assert json.loads(df.loc["cola", "dataset_metrics"]) == glue["cola"]
    assert df.loc["stsb", "accuracy"] == 0.9 and df.loc["cola", "mean_accuracy"] == 0.85


def test_schema_1_files_get_method_kind_label_lr_from_the_upgrade(sweep_df):
    kinds = sweep_df.drop_duplicates("method").set_index("method")
    assert kinds.loc["full", "method_kind"] == "reference"
    assert kinds.loc["none", "method_label"] == "Head-only"
    assert kinds.loc["randlora", "method_kind"] == "adapter" and kinds.loc["lokr", "method_label"] == "LoKr"
    assert set(sweep_df.lr) == {1e-3}  # the fixtures' trainer.lr, the lr a schema-1 runner used for them


@pytest.mark.parametrize("record, reason", [
    ({"schema": 7, "run": {"method": "lora"}}, "unknown results schema 7"),
    ({"schema": 2, "run": {"method": "lora", "lr_used": 1e-3}}, "record.run.lr_used is not a field"),
])
def test_a_record_the_schema_refuses_is_skipped_with_its_reason(tmp_path, record, reason):
    write_record(tmp_path / "good", _v2(accuracy=0.5))
    bad = write_record(tmp_path / "bad", record)
    df = load_results(tmp_path)
    assert df.source.nunique() == 1 and [s["file"] for s in df.attrs["skipped"]] == [str(bad)]
    assert df.attrs["skipped"][0]["reason"].startswith(reason)
