"""task=commonsense on a tiny LLaMA / Qwen2 stand-in: instruction training on the response only, answer
accuracy by candidate likelihood, memory savers, and the real configs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from paperstandins import causal_lm, commonsense_data
from taskhelpers import compose_task

import tasks
from runners.train import run
from tasks.common import ModelNotFoundError
from tasks.commonsense import IGNORE

BENCH = ["boolq", "piqa", "winogrande"]


@pytest.fixture(scope="module")
def standins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("paper_commonsense")
    cfg = compose_task("commonsense", "size=base")
    choices = {n: list(cfg.task.data.sources[n].choices) for n in BENCH}
    paths = commonsense_data(root, BENCH, choices)
    words = (str(cfg.task.data.prompt) + " the correct answer is question pick " + " ".join(BENCH)
             + " " + " ".join(c for cs in choices.values() for c in cs) + " 0 1 2 3 4 5 6 7 8")
    paths["llama"] = causal_lm(root / "llama", words.split(), "llama")
    paths["qwen2"] = causal_lm(root / "qwen2", words.split(), "qwen2")
    return paths


def _overrides(paths: dict[str, Path], arch: str = "llama") -> list[str]:
    return [f"task.model.path={paths[arch]}", f"task.data.train.path={paths['train']}",
            *[f"task.data.sources.{n}.path={paths[n]}" for n in BENCH], f"task.data.datasets=[{','.join(BENCH)}]",
            "trainer.batch_size=4", "trainer.eval_batch_size=8", "trainer.warmup_steps=1", "device=cpu"]


def test_configs_name_the_paper_models_targets_and_memory_savers() -> None:
    base, large = compose_task("commonsense", "size=base"), compose_task("commonsense", "size=large")
    assert base.task.model.path == "Qwen/Qwen2-0.5B" and large.task.model.path == "meta-llama/Meta-Llama-3-8B"
    assert list(base.task.model.target_modules) == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    assert list(base.task.data.datasets) == ["boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c",
                                             "obqa"]
    assert large.task.model.gradient_checkpointing and large.task.model.dtype == "bfloat16"
    assert large.trainer.batch_size * large.trainer.grad_accum == base.trainer.batch_size * base.trainer.grad_accum


def test_loss_covers_the_response_only(standins) -> None:
    task = tasks.build(compose_task("commonsense", "size=base", *_overrides(standins)).task)
    batch = next(task.train_batches(4, torch.Generator().manual_seed(0)))
    labels, ids = batch["labels"], batch["input_ids"]
    assert labels.shape == ids.shape and (labels != IGNORE).any(1).all()
    row = ids[0][labels[0] != IGNORE].tolist()
    text = task.tokenizer.decode(row)
    assert text.startswith("the correct answer is") and "instruction" not in text.lower()
    model = task.build_model()
    loss = task.loss(model, batch)
    assert torch.isfinite(loss) and loss.item() > 0
    assert task.planned_steps(4) == 3  # 1 epoch of 12 training rows at batch 4


@pytest.mark.parametrize("arch,method", [("llama", "lora"), ("qwen2", "randlora")])
def test_commonsense_base_runs_on_standins(standins, tiny_overrides, arch: str, method: str) -> None:
    cfg = compose_task("commonsense", "size=base", f"method={method}", *_overrides(standins, arch),
                       "task.model.gradient_checkpointing=true", *tiny_overrides)
    record = run(cfg)
    assert record["run"]["status"] == "success"
    acc = record["metrics"]["per_dataset"]
    assert set(acc) == set(BENCH) and all(0.0 <= a <= 1.0 for a in acc.values())


def test_scoring_picks_the_likeliest_choice(standins) -> None:
    """Evaluation = argmax of candidate log-likelihood: a model that prefers one keyword always picks it."""
    task = tasks.build(compose_task("commonsense", "size=base", *_overrides(standins), "dataset=boolq").task)
    model = task.build_model()
    true_id = task.tokenizer.convert_tokens_to_ids("true")
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[true_id] = 0.0
        model.lm_head.bias = None
    bias = torch.zeros(model.config.vocab_size)
    bias[true_id] = 50.0
    model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    gold = [a.lower() for a in task.test_sets["boolq"]["answer"]]
    assert task.evaluate(model, 4)["boolq"] == pytest.approx(gold.count("true") / len(gold))


def test_unreachable_model_and_missing_data_are_one_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = tasks.build(compose_task("commonsense", "size=base", "dataset=piqa").task)
    with pytest.raises(ModelNotFoundError, match=r"Qwen/Qwen2-0.5B.*could not be reached.*task\.model\.path"):
        task.build_model()
    with pytest.raises(FileNotFoundError, match=r"piqa.*task\.data\.sources\.piqa\.path"):
        _ = task.test_sets
    with pytest.raises(FileNotFoundError, match=r"task\.data\.train\.path"):
        _ = task.train_set
