"""Every task has a validation split: held out of train (or the dataset's own), never overlapping train or
test, fixed by the data config alone, and scored instead of test when task.data.eval_split=validation."""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from taskhelpers import compose_task

import tasks
from tasks import images, sentences

SMALL = ["task.data.train_size=60", "task.data.test_size=40"]
# clip builds its tokenizer and prompts too (~10 s on 2 shared cores): slow-marked, vision covers its data
# path
EVERY_TASK = [pytest.param("clip", marks=pytest.mark.slow), "vision", "language"]
GENERATORS = {"clip": images.make_split, "vision": images.make_split, "language": sentences.make_split}


def row_keys(ds: Dataset) -> Counter:
    """Rows by content (image bytes or text, and label): example identity for generated data."""
    column = "image" if "image" in ds.column_names else "text"
    return Counter(hashlib.sha1(repr((np.asarray(r[column]).tobytes() if column == "image" else r[column],
                                      r["label"])).encode()).hexdigest() for r in ds)


def suite(task: str, *overrides: str) -> dict:
    return tasks.build(compose_task(task, *SMALL, *overrides).task).suite


IMAGE_PAIR = "task.data.datasets=[shapes,digits]"  # rendered and real (sklearn scans): the two generators


@pytest.mark.parametrize("task", EVERY_TASK)
def test_generated_validation_is_a_hold_out_of_train_and_test_is_unchanged(task: str) -> None:
    narrow = [] if task == "language" else [IMAGE_PAIR]
    cfg = compose_task(task, *SMALL, *narrow).task.data
    for name, pair in suite(task, *narrow).items():
        full = GENERATORS[task](name, "train", len(pair.train) + len(pair.validation), int(cfg.seed))
        test = GENERATORS[task](name, "test", int(cfg.test_size), int(cfg.seed))
        assert len(pair.validation) == max(1, int(cfg.val_fraction * len(full))), name
        if cfg.generated_validation:   # train minus the hold-out; validation generated like test instead
            assert not row_keys(pair.train) - row_keys(full), name
            generated = GENERATORS[task](name, "validation", len(pair.validation), int(cfg.seed))
            assert row_keys(pair.validation) == row_keys(generated), name
        else:
            assert row_keys(pair.train) + row_keys(pair.validation) == row_keys(full), name  # a partition
        assert row_keys(pair.test) == row_keys(test), name  # the generated test split as before
        assert not set(row_keys(pair.validation)) & set(row_keys(pair.test)), name


def test_language_validation_words_are_disjoint_from_train_and_test_words() -> None:
    """Validation is generated like test: its label-bearing words are a third list, so a validation score
    measures transfer to unseen words as test does (a hold-out of train shared train's words)."""
    lists = {"sentiment": [*sentences.SENTIMENT.values(), sentences.NOUNS],
             "topic": list(sentences.TOPIC.values()),
             "emotion": list(sentences.EMOTION.values())}
    for name, pair in suite("language").items():
        words = [{w for group in lists[name] for w in group[sentences.SPLITS[split]]}
                 for split in ("train", "test", "validation")]
        assert not (words[0] & words[2]) and not (words[1] & words[2]), name
        seen = {w for text in pair.validation["text"] for w in text.split()}
        assert seen & words[2] and not seen & (words[0] | words[1]), name


@pytest.mark.parametrize("task", ["clip", "vision"])
def test_generated_image_validation_shares_no_image_with_train(task: str) -> None:
    """Rendered images are unique, so a shared row would be a leak (sentences repeat by design)."""
    for name, pair in suite(task, IMAGE_PAIR).items():
        assert not set(row_keys(pair.validation)) & set(row_keys(pair.train)), name


@pytest.mark.parametrize("task", EVERY_TASK)
def test_eval_examples_count_the_validation_split_when_it_is_scored(task: str) -> None:
    narrow = [] if task == "language" else [IMAGE_PAIR]
    built = tasks.build(compose_task(task, *SMALL, *narrow, "task.data.eval_split=validation").task)
    assert built.eval_examples() == {name: len(pair.validation) for name, pair in built.suite.items()}
    assert all(0 < n < 40 for n in built.eval_examples().values())  # the hold-out, not the 40 test examples


def test_validation_depends_on_the_data_config_only() -> None:
    a, b = suite("vision", IMAGE_PAIR, "seed=0"), suite("vision", IMAGE_PAIR, "seed=3")
    other = suite("vision", IMAGE_PAIR, "task.data.val_seed=1")
    for name in a:
        assert row_keys(a[name].validation) == row_keys(b[name].validation), name  # run seed: no effect
        assert row_keys(a[name].validation) != row_keys(other[name].validation), name  # val_seed draws


def test_regimes_sample_train_after_the_hold_out(tmp_path: Path) -> None:
    full = suite("vision", "dataset=shapes")["shapes"]
    shot = suite("vision", "dataset=shapes", "task.data.shots=2",
                 f"task.data.cache_dir={tmp_path}")["shapes"]
    assert row_keys(shot.validation) == row_keys(full.validation)
    assert len(shot.train) == 2 * len(images.SPECS["shapes"].classes)
    assert not set(row_keys(shot.train)) - set(row_keys(full.train))  # never a validation example


# --- sources (save_to_disk copies), each row carrying a unique `uid` -------------------------------------

def text_source(path: Path, splits: dict[str, int]) -> Path:
    """A GLUE-shaped copy: sentence / label / uid (unique over all splits)."""
    feats = Features({"sentence": Value("string"), "label": ClassLabel(names=["negative", "positive"]),
                      "uid": Value("int64")})
    dd, start = {}, 0
    for split, n in splits.items():
        uids = list(range(start, start + n))
        dd[split] = Dataset.from_dict({"sentence": [f"the film was good {u}" for u in uids],
                                       "label": [u % 2 for u in uids], "uid": uids}, features=feats)
        start += n
    DatasetDict(dd).save_to_disk(path)
    return path


def source_pair(tmp_path: Path, splits: dict[str, int], entry: str, *extra: str):
    path = text_source(tmp_path / "src", splits)
    return suite("language", "dataset=sentiment", "task.data.test_size=null", *extra,
                 f"+task.data.sources.sentiment={{path: {path}, text_column: sentence, {entry}}}"
                 )["sentiment"]


def uids(ds: Dataset) -> set[int]:
    return set(ds["uid"])


def test_a_source_without_its_own_validation_holds_out_part_of_train(tmp_path: Path) -> None:
    """GLUE-style: `validation` is the reported split, so validation comes out of train."""
    pair = source_pair(tmp_path, {"train": 50, "validation": 20, "test": 8}, "test_split: validation",
                       "task.data.train_size=null")
    assert uids(pair.test) == set(range(50, 70))
    assert len(pair.validation) == 5 and uids(pair.validation) <= set(range(50))
    assert uids(pair.train) | uids(pair.validation) == set(range(50))
    assert not uids(pair.train) & uids(pair.validation)


def test_a_sources_own_validation_split_is_used_whole(tmp_path: Path) -> None:
    pair = source_pair(tmp_path, {"train": 30, "validation": 12, "test": 10}, "val_split: validation",
                       "task.data.train_size=null")
    assert uids(pair.validation) == set(range(30, 42)) and uids(pair.train) == set(range(30))
    assert uids(pair.test) == set(range(42, 52))


def test_a_train_size_cap_keeps_the_same_validation(tmp_path: Path) -> None:
    whole = source_pair(tmp_path / "a", {"train": 50, "test": 10}, "test_split: test",
                        "task.data.train_size=null")
    capped = source_pair(tmp_path / "b", {"train": 50, "test": 10}, "test_split: test",
                         "task.data.train_size=12")
    assert uids(capped.validation) == uids(whole.validation) and len(capped.train) == 12
    assert not uids(capped.train) & uids(capped.validation)


def test_an_own_validation_split_that_is_the_test_split_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="val_split 'validation' is also its train or test split"):
        source_pair(tmp_path, {"train": 20, "validation": 8}, "test_split: validation, val_split: validation")


# --- what is scored -------------------------------------------------------------------------------------

def scored_labels(task: tasks.Task, name: str) -> torch.Tensor:
    data = task.data[name]
    if isinstance(data, dict):  # language: {"train", "eval"} encodings
        return data["eval"][2]
    return data.test_y if hasattr(data, "test_y") else data[3]


@pytest.mark.parametrize("task", EVERY_TASK)
def test_eval_split_validation_changes_what_is_scored(task: str) -> None:
    one = "dataset=" + ("sentiment" if task == "language" else "digits")
    on_test = tasks.build(compose_task(task, *SMALL, one).task)
    on_val = tasks.build(compose_task(task, *SMALL, one, "task.data.eval_split=validation").task)
    name = on_test.datasets[0]
    pair = on_val.suite[name]
    assert (on_test.eval_split, on_val.eval_split) == ("test", "validation")
    assert scored_labels(on_test, name).tolist() == list(pair.test["label"])
    assert scored_labels(on_val, name).tolist() == list(pair.validation["label"])
    assert len(pair.validation) != len(pair.test)


def test_an_unknown_eval_split_is_one_clear_error() -> None:
    from runners.engine.config import check_values

    cfg = compose_task("vision", "task.data.eval_split=val")
    assert check_values(cfg).startswith("task.data.eval_split=val is not valid: use test")
    with pytest.raises(ValueError, match="eval_split='val' is not a split; valid: test, validation"):
        _ = tasks.build(cfg.task).eval_split


# --- commonsense: the 120-example hold-out of its training file -------------------------------------------

@pytest.mark.slow  # builds a stand-in LM (~10 s)
def test_commonsense_validation_scores_the_hold_out_not_the_benchmarks(tmp_path: Path) -> None:
    import re

    from datasets import load_from_disk
    from paperstandins import causal_lm, commonsense_data

    names = ["boolq", "piqa"]
    base = compose_task("commonsense", "size=base")
    paths = commonsense_data(tmp_path, names, {n: list(base.task.data.sources[n].choices) for n in names},
                             {n: base.task.data.sources[n].choice_label for n in names}, n_test=2, n_train=6)
    rows = [r for n in ["train", *names] for ds in load_from_disk(str(paths[n])).values() for r in ds]
    texts = [str(base.task.data.eval_prompt), *(str(v) for r in rows for v in r.values())]
    model_path = causal_lm(tmp_path / "lm",
                           sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]+", t.lower())}))
    task = tasks.build(compose_task(
        "commonsense", "size=base", f"task.model.path={model_path}", f"task.data.train.path={paths['train']}",
        *[f"task.data.sources.{n}.path={paths[n]}" for n in names], f"task.data.datasets=[{','.join(names)}]",
        "task.model.dtype=null", "task.model.gradient_checkpointing=false", "device=cpu",
        "task.data.eval_split=validation").task)
    model = task.build_model()
    true_id = task.tokenizer.convert_tokens_to_ids("true")
    with torch.no_grad():  # the model says "true" whatever it is asked; other keywords tie (the first wins)
        model.lm_head.weight.zero_()
        model.lm_head.bias = torch.nn.Parameter(torch.nn.functional.one_hot(torch.tensor(true_id),
                                                                            model.config.vocab_size) * 50.0)
    metrics = task.evaluate_metrics(model, 4)
    assert set(metrics) == {"commonsense_validation"}
    val = task.val_set
    expected = [("true" if "true/" in r["instruction"]
                 else r["instruction"].split("Answer format: ")[1].split("/")[0]) == r["answer"]
                for r in val]
    assert metrics["commonsense_validation"]["accuracy"] == pytest.approx(sum(expected) / len(val))
    assert 0 < len(val) < 12 and metrics["commonsense_validation"]["loss"] > 0
    assert not {r["instruction"] for r in val} & {r["instruction"] for r in task.train_set}
