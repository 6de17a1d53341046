"""The generated datasets: deterministic, typed, with class names, and built as intended."""
from __future__ import annotations

import numpy as np
import pytest
from datasets import ClassLabel

from tasks import images, sentences


@pytest.mark.parametrize("name", list(images.SPECS))
def test_image_datasets_are_deterministic_and_typed(name: str) -> None:
    a, b = images.make_split(name, "test", 40), images.make_split(name, "test", 40)
    assert list(a["label"]) == list(b["label"])
    xa, xb = (d.with_format("numpy")[:]["image"] for d in (a, b))
    assert np.array_equal(xa, xb) and xa.shape == (40, 32, 32, 3)
    assert isinstance(a.features["label"], ClassLabel)
    assert a.features["label"].names == images.SPECS[name].classes
    other = images.make_split(name, "train", 40).with_format("numpy")[:]["image"]
    assert not np.array_equal(xa, other), "train and test are different draws"
    assert len(set(a["label"])) > 1
    assert list(a["label"]) != list(images.make_split(name, "test", 40, seed=1)["label"]), "data seed matters"


def test_digits_are_the_real_sklearn_scans_with_disjoint_splits() -> None:
    train, test = images.make_split("digits", "train", 5000), images.make_split("digits", "test", 5000)
    assert len(train) == 1297 and len(test) == 500
    x = np.concatenate([d.with_format("numpy")[:]["image"] for d in (train, test)]).reshape(1797, -1)
    assert len(np.unique(x, axis=0)) > 1780  # (a few sklearn scans are duplicates)


def test_data_seed_changes_the_draw() -> None:
    a = list(images.make_split("shapes", "train", 20, seed=0)["label"])
    b = list(images.make_split("shapes", "train", 20, seed=1)["label"])
    assert a != b


@pytest.mark.parametrize("name", list(sentences.SPECS))
def test_sentence_datasets_hold_out_their_label_words(name: str) -> None:
    train, test = sentences.make_split(name, "train", 300), sentences.make_split(name, "test", 300)
    assert list(train["text"]) == list(sentences.make_split(name, "train", 300)["text"])
    assert test.features["label"].names == sentences.SPECS[name].classes
    words = {"sentiment": sentences.SENTIMENT, "topic": sentences.TOPIC, "emotion": sentences.EMOTION}[name]
    held_out = {w for tr_te in words.values() for w in tr_te[1]}
    seen = {w for tr_te in words.values() for w in tr_te[0]}
    train_vocab = {w for t in train["text"] for w in t.split()}
    test_vocab = {w for t in test["text"] for w in t.split()}
    assert not held_out & train_vocab and held_out & test_vocab and not seen & test_vocab
    assert max(len(t.split()) for t in [*train["text"], *test["text"]]) <= 20


def test_a_script_based_hub_repo_is_named_as_such_not_as_unreachable(monkeypatch):
    """datasets >= 4 raises a RuntimeError for hub repos that still ship a loading script; the user must
    hear that, not that the hub could not be reached."""
    from rbtest import source

    from tasks import sources

    def refuse(*args, **kwargs):
        raise RuntimeError("Dataset scripts are no longer supported, but found imagenet-1k.py")

    monkeypatch.setattr(sources, "load_dataset", refuse)
    with pytest.raises(RuntimeError) as err:
        sources.open_source("imagenet", source(path="ILSVRC/imagenet-1k"))
    assert "script-based hub repo" in str(err.value) and "task.data.sources.imagenet.path" in str(err.value)
    assert "could not be reached" not in str(err.value)
