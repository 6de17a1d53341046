"""The paper suites' configs against what each hub copy publishes (tests/fixtures/hub/*.json, every fact with
its public source): the stand-ins are built from those facts, so a wrong belief in a config (a column name,
1-based labels, a classes file's spelling) fails here instead of on a GPU node."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from paperstandins import clip_model, curated, hub_facts, hub_standin, published_names
from taskhelpers import compose_task

import tasks
from runners.sweeps import launch_check
from runners.train import run
from tasks.pixels import labels
from tasks.prompts import align_classes, name_keys
from tasks.sources import source_config

CLIP = hub_facts("clip22")
GLUE = hub_facts("glue")
PAPER21 = list(CLIP)  # the fixture's datasets: the 22 of the paper without UCF101 (no hub copy)


def _sources(task: str) -> DictConfig:
    """The suite's sources as a run reads them (the declared source defaults merged in)."""
    data = compose_task(task, "size=base").task.data
    return OmegaConf.create({name: source_config(data, name) for name in data.sources})


def test_every_configured_copy_has_its_published_facts_with_sources() -> None:
    """Each configured hub copy has a fixture whose repo, config and columns are the config's: a config that
    names a column or repo the copy does not publish fails here."""
    sources = _sources("clip")
    assert set(CLIP) == {n for n, s in sources.items() if s.path}, "a fixture per configured copy"
    for name, facts in CLIP.items():
        src = sources[name]
        assert (src.path, src.get("config")) == (facts["repo"], facts.get("config")), name
        assert (src.image_column, src.label_column) == (facts["image_column"], facts["label_column"]), name
        assert (src.get("classes_file") is not None) == (facts["names"]["kind"] == "classnames.txt"), name
        for fact in (facts["label"], facts["names"]):
            assert fact["source"] and (fact["confirmed"] or fact["why"]), name
        assert len(published_names(name, facts)) == facts["names"]["count"] == len(curated(name)), name
    glue = _sources("language")
    for name, facts in GLUE.items():
        src = glue[name]
        assert (src.path, src.config) == (facts["repo"], facts["config"]), name
        columns = [src.text_column, src.get("text_pair_column")]
        assert columns[: len(facts["text_columns"])] == facts["text_columns"]


def test_no_configured_copy_ships_a_loading_script_by_its_published_files() -> None:
    """datasets >= 4 refuses only `<repo name>.py`: bentrevett/caltech-ucsd-birds-200-2011's root script.py
    is a plain file, ILSVRC/imagenet-1k's imagenet-1k.py is a loading script."""
    for name, facts in CLIP.items():
        assert launch_check.loading_script(facts["repo"], facts["files"]) is None, name
    assert "script.py" in CLIP["cub200"]["files"]
    assert (launch_check.loading_script("ILSVRC/imagenet-1k", ["imagenet-1k.py", "classes.py"])
            == "imagenet-1k.py")


def test_raw_voc_names_align_by_their_space_free_form() -> None:
    """clip-benchmark/wds_voc2007's classnames.txt holds VOC's raw names (diningtable, pottedplant,
    tvmonitor): the official names reach them only through their space-free form."""
    raw = CLIP["pascal_voc"]["names"]["values"]
    aligned = align_classes("pascal_voc", curated("pascal_voc"), raw)
    assert [aligned[raw.index(r)] for r in ("diningtable", "pottedplant", "tvmonitor")] == [
        "dining table", "potted plant", "tv monitor"]
    assert aligned == curated("pascal_voc"), "VOC's raw order is the official order"
    assert align_classes("x", ["tv monitor", "sofa"], ["sofa", "tvmonitor"]) == ["sofa", "tv monitor"]
    with pytest.raises(ValueError, match="3 of 20 unmatched"):  # what spelling-only matching did with them
        align_classes("pascal_voc", curated("pascal_voc"),
                      [r + "s" if r in ("diningtable", "pottedplant", "tvmonitor") else r for r in raw])


@pytest.fixture(scope="module")
def hub_copies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every dataset of the CLIP suite as its fixture describes the hub copy (8 examples per split spanning
    the published label range), plus the tiny CLIP model."""
    root = tmp_path_factory.mktemp("hub_copies")
    out = {name: hub_standin(root / name, name, facts) for name, facts in CLIP.items()}
    out["clip"] = clip_model(root / "clip")
    return out


def _suite_cfg(hub_copies: dict[str, Path], names: list[str], *extra: str):
    return compose_task("clip", "size=base", f"task.model.path={hub_copies['clip']}",
                        *[f"task.data.sources.{n}.path={hub_copies[n]}" for n in names],
                        f"task.data.datasets=[{','.join(names)}]", "task.data.val_fraction=0", *extra)


def test_the_suite_loads_from_its_published_shapes(hub_copies) -> None:
    """Class names align with every copy's published names and every label lands in [0, classes)."""
    suite = tasks.build(_suite_cfg(hub_copies, PAPER21).task).suite
    for name, pair in suite.items():
        assert sorted(pair.classes) == sorted(curated(name)), name
        if CLIP[name]["names"]["complete"]:  # each prompt name is its label's published name, respelled
            published = published_names(name, CLIP[name])
            assert all(set(name_keys(c)) & set(name_keys(p))
                       for c, p in zip(pair.classes, published, strict=True)), name
        for split in (pair.train, pair.test):
            ys = labels(split)
            assert int(ys.min()) >= 0 and int(ys.max()) < len(pair.classes), name
    raw = hub_copies["caltech256"]
    hub_labels = json.loads((raw / "dataset_dict.json").read_text())["splits"]
    assert hub_labels == list(CLIP["caltech256"]["splits"])
    caltech = suite["caltech256"].test
    first = caltech.filter(lambda r: r["text"] == "ak47")
    last = caltech.filter(lambda r: r["text"] == "clutter")
    assert suite["caltech256"].classes[first["label"][0]] == "ak47", "hub label 1 is the first class"
    assert suite["caltech256"].classes[last["label"][0]] == "clutter", "hub label 257 is the last"


def test_labels_outside_the_class_range_are_one_clear_error(hub_copies) -> None:
    cfg = _suite_cfg(hub_copies, ["caltech256"], "task.data.sources.caltech256.label_offset=0")
    with pytest.raises(ValueError) as err:
        _ = tasks.build(cfg.task).suite
    assert str(err.value) == (
        "dataset 'caltech256', split 'train': label 257 is outside [0, 257) (labels span 1..257, 257 class "
        "names); set task.data.sources.caltech256.label_offset=-1 (labels start at 1) or "
        "task.data.sources.caltech256.classes=[...] naming every label in order")


@pytest.fixture(scope="module")
def shifted_caltech(hub_copies, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """caltech256 whose `text` names each row with the next class's name: labels in range, names one off."""
    from datasets import DatasetDict, load_from_disk

    names = published_names("caltech256", CLIP["caltech256"])
    dd = load_from_disk(str(hub_copies["caltech256"]))
    shifted = {s: d.remove_columns("text").add_column("text", [names[y % len(names)] for y in d["label"]])
               for s, d in dd.items()}
    path = tmp_path_factory.mktemp("shifted") / "caltech256"
    DatasetDict(shifted).save_to_disk(path)
    return path


def test_row_names_that_contradict_the_prompts_are_one_clear_error(hub_copies, shifted_caltech) -> None:
    cfg = _suite_cfg(hub_copies, ["caltech256"], f"task.data.sources.caltech256.path={shifted_caltech}")
    with pytest.raises(ValueError) as err:
        _ = tasks.build(cfg.task).suite
    assert str(err.value).startswith(
        "dataset 'caltech256', split 'train': 8 of 8 labels disagree with their 'text' names (label 0 is "
        "named 'american flag' but prompted as 'ak47'): the labels are shifted or the names are in another "
        "order")
    assert "set task.data.sources.caltech256.label_offset or" in str(err.value)
    src = source_config(cfg.task.data, "caltech256")
    problems = launch_check.check_dataset("caltech256", src, cfg.task).problems
    assert len(problems) == 3 and all("labels disagree with their 'text' names" in p for p in problems)


def test_preflight_reads_each_split_label_range_of_local_copies(hub_copies, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _suite_cfg(hub_copies, PAPER21)
    records = {name: launch_check.check_dataset(name, source_config(cfg.task.data, name), cfg.task)
               for name in PAPER21}
    assert {n: r.problems for n, r in records.items() if r.problems} == {}
    train = records["caltech256"].labels["train"]
    assert (train["dtype"], train["min"], train["max"], train["rows"]) == ("int64", 1, 257, 8)
    assert train["pairs"][0] == (1, "ak47") and train["pairs"][-1] == (257, "clutter")
    assert records["pascal_voc"].classes[10] == "dining table" and records["pascal_voc"].num_classes == 20
    src = source_config(cfg.task.data, "caltech256")
    src.label_offset = 0
    assert launch_check.check_dataset("caltech256", src, cfg.task).problems == [
        f"split {s!r}: label 257 is outside [0, 257) (labels span 1..257, 257 class names); set "
        "task.data.sources.caltech256.label_offset=-1 (labels start at 1) or "
        "task.data.sources.caltech256.classes=[...] naming every label in order"
        for s in ("train", "test", "validation")]


def test_preflight_names_a_classes_file_that_does_not_align(hub_copies, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _suite_cfg(hub_copies, ["pascal_voc"])
    src = source_config(cfg.task.data, "pascal_voc")
    copy = tmp_path / "voc"
    hub_standin(copy, "pascal_voc", CLIP["pascal_voc"])
    src.path = str(copy)
    (copy / "classnames.txt").write_text("\n".join(CLIP["pascal_voc"]["names"]["values"][:19]) + "\n")
    assert launch_check.check_dataset("pascal_voc", src, cfg.task).problems == [
        ("dataset 'pascal_voc' has 19 labels but its curated class names list 20; set "
         "task.data.sources.pascal_voc.classes=[...] or prompts=null")]
    (copy / "classnames.txt").write_text("\n".join(curated("country211")[:20]) + "\n")
    problems = launch_check.check_dataset("pascal_voc", src, cfg.task).problems
    assert len(problems) == 1 and "do not match the dataset's label names (20 of 20 unmatched" in problems[0]


def test_preflight_streams_the_first_rows_of_integer_labels(hub_copies, tmp_path) -> None:
    """A hub copy without a ClassLabel (caltech256's int64, a webdataset's cls) is checked by a bounded
    streaming read; here a parquet folder shaped as the hub repo stands in for it."""
    from datasets import load_from_disk

    for split, ds in load_from_disk(str(hub_copies["caltech256"])).items():
        ds.to_parquet(tmp_path / "data" / f"{split}-00000-of-00001.parquet")
    src = _sources("clip").caltech256
    stats = launch_check._stream_labels(str(tmp_path), src, "test", "label")
    assert (stats["min"], stats["max"], stats["rows"]) == (1, 257, 8) and "streamed" in stats["from"]
    assert (1, "ak47") in stats["pairs"], "the row names come along (name_column)"
    unreadable = launch_check._stream_labels(str(tmp_path / "none"), src, "test", "label")
    assert "unreadable" in unreadable["problem"]


@pytest.mark.slow
def test_a_few_training_steps_on_the_published_shapes(hub_copies, tiny_overrides) -> None:
    names = ["pascal_voc", "caltech256"]
    cfg = _suite_cfg(hub_copies, names, *tiny_overrides, "device=cpu", "trainer.batch_size=4",
                     "trainer.eval_batch_size=8")
    record = run(cfg)
    assert record["run"]["status"] == "success" and set(record["metrics"]["per_dataset"]) == set(names)
    assert all(0.0 <= a <= 1.0 for a in record["metrics"]["per_dataset"].values())
    assert torch.isfinite(torch.tensor([h["loss"] for h in record["history"]])).all()


def test_preflight_takes_a_classlabel_range_from_the_card_and_streams_the_rest(monkeypatch) -> None:
    """A card's ClassLabel fixes the range without reading data; integer labels go to the bounded read."""
    from datasets import ClassLabel, Features, Value

    src = _sources("clip").cars
    rec = launch_check.DatasetReport("cars", {}, splits={"train": 8144, "test": 8041})
    card = Features({"label": ClassLabel(names=["a", "b", "c"])})
    assert launch_check._hub_labels("tanganke/stanford_cars", src, card, rec) == {
        s: {"dtype": "ClassLabel", "min": 0, "max": 2, "from": "card"} for s in ("train", "test")}
    streamed = []
    monkeypatch.setattr(launch_check, "_stream_labels",
                        lambda path, src, split, column: streamed.append(split) or {})
    launch_check._hub_labels("tanganke/stanford_cars", src, Features({"label": Value("int64")}), rec)
    assert streamed == ["train", "test"]
