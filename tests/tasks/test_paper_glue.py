"""size=base of task=language (RoBERTa on GLUE) on local stand-ins: sentence pairs, a regression task and
each task's own metric next to accuracy."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from paperstandins import glue_dataset, roberta_model
from taskhelpers import compose_task

import tasks
from runners.train import run
from tasks import metrics
from tasks.common import ModelNotFoundError

GLUE = {"sst2": (["sentence"], "int"), "mrpc": (["sentence1", "sentence2"], "int"),
        "cola": (["sentence"], "int"), "stsb": (["sentence1", "sentence2"], "float")}


@pytest.fixture(scope="module")
def glue(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("paper_glue")
    out = {name: glue_dataset(root / name, cols, label) for name, (cols, label) in GLUE.items()}
    out["model"] = roberta_model(root / "roberta")
    return out


def _overrides(glue: dict[str, Path], tmp_path: Path) -> list[str]:
    return [f"task.model.path={glue['model']}", *[f"task.data.sources.{n}.path={glue[n]}" for n in GLUE],
            f"task.data.datasets=[{','.join(GLUE)}]", f"task.data.cache_dir={tmp_path / 'cache'}",
            "trainer.batch_size=8", "trainer.eval_batch_size=16", "device=cpu"]


def test_glue_config_names_roberta_and_the_six_tasks() -> None:
    for size, model in (("base", "FacebookAI/roberta-base"), ("large", "FacebookAI/roberta-large")):
        cfg = compose_task("language", f"size={size}")
        assert cfg.task.model.path == model
        assert list(cfg.task.data.datasets) == ["sst2", "mrpc", "cola", "qnli", "rte", "stsb"]
        assert cfg.task.data.sources.stsb.primary == "pearson" and cfg.trainer.lr == 1e-4


def test_glue_base_runs_on_standins_with_task_metrics(glue, tiny_overrides, tmp_path) -> None:
    cfg = compose_task("language", "size=base", "method=lora", *_overrides(glue, tmp_path), *tiny_overrides)
    task = tasks.build(cfg.task)
    model = task.build_model()
    assert model.heads["stsb"].out_features == 1 and model.heads["mrpc"].out_features == 2
    batch = next(b for b in task.train_batches(8, __import__("torch").Generator().manual_seed(0))
                 if b["dataset"] == "mrpc")
    sep = task.tokenizer.sep_token_id
    assert (batch["input_ids"] == sep).sum(1).min() >= 3, "pairs are encoded as <s> A </s></s> B </s>"
    scores = task.evaluate_metrics(model, batch_size=16)
    assert set(scores["cola"]) == {"accuracy", "matthews_corr"} and set(scores["mrpc"]) == {"accuracy", "f1"}
    assert set(scores["stsb"]) == {"pearson", "spearman"}
    assert task.evaluate(model, 16)["stsb"] == scores["stsb"]["pearson"] and task.primary_metric("stsb") == "pearson"
    assert task.primary_metric("cola") == "accuracy"
    assert task.planned_steps(8) == 10 * 6 * 4  # 10 epochs x ceil(48 / 8) x 4 tasks
    record = run(cfg)
    assert record["run"]["status"] == "success" and set(record["metrics"]["per_dataset"]) == set(GLUE)


def test_metrics_match_their_definitions() -> None:
    y, p = np.array([1, 0, 1, 1, 0]), np.array([1, 0, 0, 1, 1])
    assert metrics.accuracy(p, y) == 0.6 and metrics.f1(p, y) == pytest.approx(2 / 3)
    assert metrics.matthews_corr(y, y) == 1.0
    assert metrics.pearson(np.array([1.0, 2, 3]), np.array([2.0, 4, 6])) == pytest.approx(1.0)
    assert metrics.spearman(np.array([1.0, 5, 9]), np.array([0.1, 0.2, 0.3])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown metric.*valid"):
        metrics.compute(["bleu"], p, y)


def test_unreachable_roberta_and_glue_are_one_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    task = tasks.build(compose_task("language", "size=base", "dataset=rte").task)
    with pytest.raises(ModelNotFoundError, match=r"FacebookAI/roberta-base.*could not be reached.*task\.model\.path"):
        task.build_model()
    with pytest.raises(FileNotFoundError, match=r"nyu-mll/glue.*could not be reached.*task\.data\.sources\.rte\.path"):
        _ = task.suite
