"""Every task, built from its composed Hydra config, honours the Task contract the runner relies on."""
from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
from taskhelpers import SMALL, TASKS, compose_task
from torch import nn

import tasks
from tasks.models import ModelNotFoundError


def test_registry_has_every_configured_task() -> None:
    assert set(TASKS) <= set(tasks.available())
    for name in TASKS:
        cfg = compose_task(name)
        assert cfg.task.kind == name and cfg.task.name == name
        assert cfg.size.name == "tiny"


def test_target_modules_name_linear_layers(built) -> None:
    task, model = built
    targets = task.target_modules
    hits = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
    assert hits, f"no Linear matches {targets}"
    assert {n.split(".")[-1] for n in hits} == set(targets), "every configured target must exist"
    heads = [n for n, _ in model.named_parameters() if any(n.startswith(h) for h in task.head_prefixes)]
    assert bool(heads) == bool(task.head_prefixes)
    assert not any(n.startswith(tuple(task.head_prefixes)) for n in hits) if task.head_prefixes else True


def test_batches_are_consistent_and_loss_backprops(built) -> None:
    task, model = built
    batches = list(itertools.islice(task.train_batches(16, torch.Generator().manual_seed(0)),
                                    2 * len(task.datasets)))
    assert [b["dataset"] for b in batches] == task.datasets * 2  # round robin, homogeneous batches
    for b in batches:
        n = len(b["labels"])
        assert n == 16 and b["labels"].dtype == torch.long
        for k, v in b.items():
            if isinstance(v, torch.Tensor) and k in ("pixel_values",):
                assert v.shape[0] == n and v.dtype == torch.float32
            if k == "input_ids":
                assert v.shape == b["attention_mask"].shape
    loss = task.loss(model, batches[0])
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)


def test_evaluate_gives_accuracy_per_dataset(built) -> None:
    task, model = built
    model.train()
    acc = task.evaluate(model, batch_size=20)
    assert set(acc) == set(task.datasets)
    assert all(0.0 <= a <= 1.0 for a in acc.values())
    assert model.training, "evaluate restores the training flag"
    assert task.evaluate(model, batch_size=48) == acc, "evaluation is deterministic and batch-size free"


def test_eval_metrics_hold_the_accuracy_and_the_eval_loss(built) -> None:
    """Every dataset's entry has the accuracy `evaluate` reports and a finite mean loss (what breaks ties
    between learning rates), independent of the evaluation batch size."""
    task, model = built
    small, large = task.evaluate_metrics(model, batch_size=20), task.evaluate_metrics(model, batch_size=48)
    assert {n: m["accuracy"] for n, m in small.items()} == task.evaluate(model, batch_size=20)
    for name, m in small.items():
        assert math.isfinite(m["loss"]) and m["loss"] > 0, name
        assert large[name]["loss"] == pytest.approx(m["loss"], rel=1e-5), name


def test_eval_examples_are_the_denominators_of_the_accuracies(built) -> None:
    """metrics.eval_examples, the n of each accuracy's binomial error, counts the examples evaluate scored."""
    task, model = built
    n = task.eval_examples()
    assert n == dict.fromkeys(task.datasets, int(task.cfg.data.test_size))
    for name, acc in task.evaluate(model, batch_size=20).items():
        assert acc * n[name] == pytest.approx(round(acc * n[name]), abs=1e-9), name  # correct / n


def test_same_seed_same_batches(built) -> None:
    task, _ = built
    a = next(task.train_batches(8, torch.Generator().manual_seed(3)))
    b = next(task.train_batches(8, torch.Generator().manual_seed(3)))
    c = next(task.train_batches(8, torch.Generator().manual_seed(4)))
    assert torch.equal(a["labels"], b["labels"]) and a["dataset"] == b["dataset"]
    key = "pixel_values" if "pixel_values" in a else "input_ids"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


@pytest.mark.parametrize("name,one", [("clip", "digits"), ("vision", "shapes"), ("language", "topic")])
def test_dataset_override_restricts_the_suite(name: str, one: str) -> None:
    task = tasks.build(compose_task(name, f"dataset={one}", *SMALL).task)
    assert task.datasets == [one]
    with pytest.raises(ValueError, match=r"unknown dataset 'nope'.*valid"):
        _ = tasks.build(compose_task(name, "dataset=nope").task).datasets


@pytest.mark.parametrize("name", TASKS)
def test_missing_model_path_is_one_clear_error(name: str, tmp_path) -> None:
    task = tasks.build(compose_task(name, "task.model.path=no-such-model").task)
    with pytest.raises(ModelNotFoundError) as e:
        task.build_model()
    msg = str(e.value)
    assert "no-such-model" in msg and "runners.pretrain" in msg and "task.model.path" in msg
    missing = tmp_path / "gone"
    task = tasks.build(compose_task(name, f"task.model.path={missing}").task)
    with pytest.raises(ModelNotFoundError, match=re.escape(str(missing))):
        task.build_model()


def test_a_configured_source_loads_with_load_from_disk(tmp_path) -> None:
    """The seam real datasets use: `task.data.sources.<name>` pointing at a save_to_disk copy."""
    from datasets import DatasetDict

    from tasks import images

    dd = DatasetDict({s: images.make_split("shapes", s, 24) for s in ("train", "validation")})
    dd = dd.rename_columns({"image": "img", "label": "y"})
    dd.save_to_disk(tmp_path / "shapes")
    cfg = compose_task("vision", "dataset=shapes", *SMALL,
                       f"+task.data.sources.shapes={{path: {tmp_path / 'shapes'}, test_split: validation, "
                       "image_column: img, label_column: y}")
    task = tasks.build(cfg.task)
    pair = task.suite["shapes"]  # train less the seeded validation hold-out, nothing lost or shared
    assert len(pair.train) + len(pair.validation) == 24 and len(pair.validation) > 0
    assert task.suite["shapes"].classes == images.SPECS["shapes"].classes
    assert task.data["shapes"][0].shape == (len(pair.train), 3, 32, 32)
    bad = compose_task("vision", "dataset=shapes", "+task.data.sources.shapes={path: /nonexistent/x}")
    with pytest.raises(FileNotFoundError, match=r"/nonexistent/x.*save_to_disk"):
        _ = tasks.build(bad.task).suite
