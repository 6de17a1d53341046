"""size=base of task=language (RoBERTa on GLUE) on local stand-ins: the official RandLoRA GLUE protocol
(RoBERTa classification head, targets, optimizer and schedule, headline metrics), sentence pairs and a
regression task."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from paperstandins import glue_standin, hub_facts, roberta_model
from taskhelpers import compose_task
from transformers import RobertaModel

import methods
import tasks
from runners.engine.adapt import adapt
from runners.train import run
from tasks import metrics
from tasks.models import ModelNotFoundError, eval_mode
from tasks.sources import source_config

# columns, label names and dtypes as nyu-mll/glue publishes them (tests/fixtures/hub/glue.json, from its card)
GLUE = {name: facts for name, facts in hub_facts("glue").items() if name in ("sst2", "mrpc", "cola", "stsb")}
HIDDEN = 32  # paperstandins.TINY hidden_size


@pytest.fixture(scope="module")
def glue(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("paper_glue")
    out = {name: glue_standin(root / name, facts) for name, facts in GLUE.items()}
    out["model"] = roberta_model(root / "roberta")
    return out


def _overrides(glue: dict[str, Path], tmp_path: Path) -> list[str]:
    return [f"task.model.path={glue['model']}", *[f"task.data.sources.{n}.path={glue[n]}" for n in GLUE],
            f"task.data.datasets=[{','.join(GLUE)}]", f"task.data.cache_dir={tmp_path / 'cache'}",
            "trainer.batch_size=8", "trainer.eval_batch_size=16", "device=cpu"]


def test_glue_config_has_the_official_protocol() -> None:
    for size, model in (("base", "FacebookAI/roberta-base"), ("large", "FacebookAI/roberta-large")):
        cfg = compose_task("language", f"size={size}", "seed=3")
        m, d, t = cfg.task.model, cfg.task.data, cfg.trainer
        assert m.path == model
        assert (m.head, m.head_bias, m.head_init_std, m.pool) == ("roberta", True, 0.02, "cls")
        assert m.target_modules == r"(backbone\.)?encoder\..*\.(query|key|value|dense)"
        assert list(d.datasets) == ["sst2", "mrpc", "cola", "qnli", "rte", "stsb"]
        assert d.max_length == 128 and d.seed == 3, "head init follows the run seed"
        assert all(d.sources[n].epochs == 10 and d.sources[n].test_split == "validation" for n in d.datasets)
        assert (t.batch_size, t.grad_accum, t.lr, t.weight_decay) == (64, 1, 1e-4, 0.0)
        assert (t.warmup_ratio, t.schedule, t.final_lr_ratio, t.grad_clip) == (0.06, "linear", 0.0, 1.0)
        primary = {n: d.sources[n].primary for n in d.datasets}
        assert primary == {"sst2": "accuracy", "mrpc": "accuracy", "cola": "matthews_corr",
                           "qnli": "accuracy", "rte": "accuracy", "stsb": "pearson_spearman_mean"}
        assert set(d.sources.stsb.metrics) == {"pearson_spearman_mean", "pearson", "spearman"}
        assert "f1" in d.sources.mrpc.metrics
        protocol = cfg.task.protocol
        assert "PaulAlbert31/RandLoRA" in protocol.source
        assert all(dev.what and dev.why for dev in protocol.deviations)
        listed = " ".join(dev.what for dev in protocol.deviations)
        assert "eps" in listed and "bf16" in listed and "dense" in listed and "full fine-tuning" in listed


def test_tiny_language_suite_keeps_its_linear_head() -> None:
    cfg = compose_task("language")
    assert cfg.task.model.head == "linear" and cfg.task.model.pool == "mean"
    assert list(cfg.task.model.target_modules) == ["query", "key", "value", "dense"]


def test_glue_metrics_against_hand_computed_values() -> None:
    # 2x2 confusion: TP 3, FN 2, FP 1, TN 2.
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (6 - 2) / sqrt(4*5*3*4) = 4 / sqrt(240)
    # F1 = 2PR / (P+R) with P = 3/4, R = 3/5: 0.9 / 1.35 = 2/3; accuracy 5/8
    y = np.array([1, 1, 1, 1, 1, 0, 0, 0])
    p = np.array([1, 1, 1, 0, 0, 1, 0, 0])
    assert metrics.matthews_corr(p, y) == pytest.approx(4 / math.sqrt(240))
    assert metrics.f1(p, y) == pytest.approx(2 / 3) and metrics.accuracy(p, y) == 5 / 8
    # pred 1,2,3,4 against y 1,3,2,10: deviations from the means (2.5, 4) are -1.5,-.5,.5,1.5 and -3,-1,-2,6
    # Pearson r = (4.5 + .5 - 1 + 9) / sqrt(5 * 50) = 13 / sqrt(250)
    # Spearman = Pearson of the ranks 1,2,3,4 and 1,3,2,4 = (2.25 - .25 - .25 + 2.25) / 5 = 0.8
    pred, gold = np.array([1.0, 2, 3, 4]), np.array([1.0, 3, 2, 10])
    assert metrics.pearson(pred, gold) == pytest.approx(13 / math.sqrt(250))
    assert metrics.spearman(pred, gold) == pytest.approx(0.8)
    both = metrics.compute(["pearson_spearman_mean", "pearson", "spearman"], pred, gold)
    assert both["pearson_spearman_mean"] == pytest.approx((13 / math.sqrt(250) + 0.8) / 2)
    with pytest.raises(ValueError, match=r"unknown metric.*valid"):
        metrics.compute(["bleu"], p, y)


def test_roberta_head_is_trained_and_only_backbone_layers_get_adapters(glue, tmp_path) -> None:
    cfg = compose_task("language", "size=base", "method=lora", "dataset=cola", *_overrides(glue, tmp_path))
    task = tasks.build(cfg.task)
    model = task.build_model()
    head = model.heads["cola"]
    assert [n for n, _ in head.named_children()] == ["dropout", "dense", "tanh", "out_dropout", "out_proj"]
    assert head.dense.in_features == head.dense.out_features == HIDDEN and head.out_proj.out_features == 2
    assert head.dropout.p == 0.1, "RoBERTa's hidden_dropout_prob"
    adaptation = adapt(model, cfg.method, task.target_modules, task.head_prefixes, None)
    leaves = {".".join(n.split(".")[-2:]) for n in adaptation.wrapped}
    assert leaves == {"self.query", "self.key", "self.value", "output.dense", "intermediate.dense"}
    assert len(adaptation.wrapped) == 2 * 6 and all(n.startswith("backbone.") for n in adaptation.wrapped)
    assert not isinstance(head.dense, methods.AdapterLayer)
    # the same layers of a bare RobertaModel (the skeleton runners.preflight checks)
    skeleton = RobertaModel.from_pretrained(glue["model"])
    assert len(methods.find_targets(skeleton, task.target_modules)) == 2 * 6
    assert adaptation.head_trainable == (HIDDEN * HIDDEN + HIDDEN) + (HIDDEN * 2 + 2)
    assert all(p.requires_grad for p in head.parameters())
    batch = next(task.train_batches(8, torch.Generator().manual_seed(0)))
    task.loss(model, batch).backward()
    assert head.dense.weight.grad.abs().sum() > 0 and head.out_proj.weight.grad.abs().sum() > 0


def test_glue_base_cola_run_reports_matthews_corr_with_a_linear_schedule(glue, tiny_overrides,
                                                                          tmp_path) -> None:
    cfg = compose_task("language", "size=base", "method=lora", "dataset=cola", *_overrides(glue, tmp_path),
                       *tiny_overrides, "trainer.max_steps=5", "trainer.log_every=1")
    record = run(cfg)
    assert record["run"]["status"] == "success"
    m = record["metrics"]
    assert set(m["per_dataset_metrics"]["cola"]) == {"matthews_corr", "accuracy", "loss"}
    assert m["per_dataset"]["cola"] == m["per_dataset_metrics"]["cola"]["matthews_corr"]
    assert record["params"]["head_trainable"] == (HIDDEN * HIDDEN + HIDDEN) + (HIDDEN * 2 + 2)
    # 5 steps: warm-up round(0.06 * 5) = 0 steps, then linear decay to 0 at the last step
    assert [h["lr"] for h in record["history"]] == pytest.approx([8e-5, 6e-5, 4e-5, 2e-5, 0.0])
    assert any("eps" in dev["what"] for dev in record["run"]["protocol"]["deviations"])
    saved = json.loads((Path(cfg.out_dir) / "adapter" / "adapter_config.json").read_text())
    assert saved["modules"] and not any(name.startswith("heads.") for name in saved["modules"])


def test_glue_base_builds_pairs_regression_and_task_metrics(glue, tiny_overrides, tmp_path) -> None:
    cfg = compose_task("language", "size=base", "method=lora", *_overrides(glue, tmp_path), *tiny_overrides)
    task = tasks.build(cfg.task)
    model = task.build_model()
    assert model.heads["stsb"].out_proj.out_features == 1 and model.heads["mrpc"].out_proj.out_features == 2
    batch = next(b for b in task.train_batches(8, torch.Generator().manual_seed(0)) if b["dataset"] == "mrpc")
    sep = task.tokenizer.sep_token_id
    assert (batch["input_ids"] == sep).sum(1).min() >= 3, "pairs are encoded as <s> A </s></s> B </s>"
    scores = task.evaluate_metrics(model, batch_size=16)
    assert set(scores["cola"]) == {"accuracy", "matthews_corr", "loss"}
    assert set(scores["mrpc"]) == {"accuracy", "f1", "loss"}
    assert set(scores["stsb"]) == {"pearson_spearman_mean", "pearson", "spearman", "loss"}
    for name in ("cola", "stsb"):  # the eval loss is the training loss (cross-entropy; MSE for STS-B) on eval
        ids, mask, y = task.data[name]["eval"]
        with torch.no_grad(), eval_mode(model):
            batch = {"dataset": name, "input_ids": ids, "attention_mask": mask, "labels": y}
            train_loss = task.loss(model, batch)
        assert scores[name]["loss"] == pytest.approx(train_loss.item(), rel=1e-5), name
    assert task.evaluate(model, 16)["stsb"] == scores["stsb"]["pearson_spearman_mean"]
    assert task.primary_metric("cola") == "matthews_corr" and task.primary_metric("mrpc") == "accuracy"
    assert task.planned_steps(8) == 10 * 6 * 4  # 10 epochs x ceil(48 / 8) x 4 tasks


def test_glue_suite_run_trains_one_adapter_per_dataset(glue, tiny_overrides, tmp_path) -> None:
    cfg = compose_task("language", "size=base", "method=lora", *_overrides(glue, tmp_path), *tiny_overrides,
                       "task.data.datasets=[mrpc,stsb]", "trainer.max_steps=2")
    record = run(cfg)
    assert record["run"]["status"] == "success" and set(record["run"]["parts"]) == {"mrpc", "stsb"}
    assert set(record["metrics"]["per_dataset"]) == {"mrpc", "stsb"}
    stsb = record["metrics"]["per_dataset_metrics"]["stsb"]
    assert record["metrics"]["per_dataset"]["stsb"] == stsb["pearson_spearman_mean"]


def test_unreachable_roberta_and_glue_are_one_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    task = tasks.build(compose_task("language", "size=base", "dataset=rte").task)
    with pytest.raises(ModelNotFoundError,
                       match=r"FacebookAI/roberta-base.*could not be reached.*task\.model\.path"):
        task.build_model()
    with pytest.raises(FileNotFoundError,
                       match=r"nyu-mll/glue.*could not be reached.*task\.data\.sources\.rte\.path"):
        _ = task.suite


def test_preflight_reads_the_glue_label_ranges(glue, tmp_path, monkeypatch) -> None:
    """Labels as nyu-mll/glue publishes them: 0/1 on validation (scored), -1 on the hidden test split, which a
    run therefore never scores; STS-B's float targets have no range to check."""
    from runners.sweeps import launch_check

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose_task("language", "size=base", *_overrides(glue, tmp_path))
    records = {n: launch_check.check_dataset(n, source_config(cfg.task.data, n), cfg.task) for n in GLUE}
    assert {n: r.problems for n, r in records.items() if r.problems} == {}
    cola, stsb = records["cola"].labels["validation"], records["stsb"].labels["validation"]
    assert (cola["min"], cola["max"]) == (0, 1)
    assert stsb["dtype"] == "float32" and "min" not in stsb
    src = source_config(cfg.task.data, "cola")
    src.test_split = "test"
    assert launch_check.check_dataset("cola", src, cfg.task).problems == [(
        "split 'test': label -1 is outside [0, 2) (labels span -1..-1, 2 class names); negative labels "
        "mark unlabelled examples: point task.data.sources.cola.train_split / test_split / val_split at a "
        "labelled split")]
