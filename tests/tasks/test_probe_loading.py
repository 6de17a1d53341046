"""What a CLIP run reads from hub-shaped copies: its own dataset's train and test splits, and of the suite's
other datasets (the forgetting probe) only the test split; a probe set that cannot be loaded is recorded as
missing and the run goes on. The copies are laid out as the hub repos are (webdataset tar shards per split
folder as clip-benchmark/wds_*; parquet shards data/<split>-*.parquet with extra corruption splits as the
tanganke copies), so `load_dataset` runs the same code it runs on the hub."""
from __future__ import annotations

import io
import json
import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Image
from omegaconf import DictConfig
from paperstandins import clip_model, curated
from PIL import Image as PILImage
from taskhelpers import compose_task

from runners.train import run
from tasks import splits

_OPENED: list[list[str]] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], (str, Path)):
        for seen in _OPENED:
            seen.append(str(args[0]))


sys.addaudithook(_audit)


@contextmanager
def files_opened(root: Path) -> Iterator[list[str]]:
    """Paths under `root` (relative) that Python opened inside the block (sys.audit "open" events)."""
    found_raw: list[str] = []
    _OPENED.append(found_raw)
    found: list[str] = []
    try:
        yield found
    finally:
        seen = _OPENED.pop(next(i for i, active in enumerate(_OPENED) if active is found_raw))
        found.extend(sorted({str(Path(p).resolve().relative_to(root.resolve())) for p in seen
                             if Path(p).resolve().is_relative_to(root.resolve())}))


def _jpeg(label: int, rng: np.random.Generator) -> bytes:
    pixels = (np.full((24, 24, 3), 40 + 50 * (label % 4), dtype=np.uint8)
              + rng.integers(0, 30, (24, 24, 3), np.uint8))
    out = io.BytesIO()
    PILImage.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def hub_webdataset(root: Path, classnames: list[str], shards: dict[str, int], per_shard: int = 8) -> Path:
    """A clip-benchmark/wds_* layout: <split>/<n>.tar holding <key>.jpg + <key>.cls, classnames.txt at the
    root."""
    rng = np.random.default_rng(0)
    for split, count in shards.items():
        (root / split).mkdir(parents=True)
        for shard in range(count):
            with tarfile.open(root / split / f"{shard}.tar", "w") as tar:
                for i in range(per_shard):
                    label = (shard * per_shard + i) % len(classnames)
                    for ext, payload in (("jpg", _jpeg(label, rng)), ("cls", str(label).encode())):
                        info = tarfile.TarInfo(f"s{shard:03d}{i:04d}.{ext}")
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    return root


def hub_parquet(root: Path, classes: list[str], splits: dict[str, int]) -> Path:
    """A tanganke/* layout: data/<split>-00000-of-00001.parquet, image + ClassLabel label."""
    rng = np.random.default_rng(1)
    features = Features({"image": Image(), "label": ClassLabel(names=classes)})
    (root / "data").mkdir(parents=True)
    for split, n in splits.items():
        ys = [i % len(classes) for i in range(n)]
        ds = Dataset.from_dict({"image": [{"bytes": _jpeg(y, rng), "path": None} for y in ys], "label": ys},
                               features=features)
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


CORRUPTIONS = ["contrast", "gaussian_noise", "impulse_noise"]  # extra splits, as the tanganke copies carry


@pytest.fixture(scope="module")
def copies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hubcopies")
    cars = curated("cars")[:8]
    return {
        "clip": clip_model(root / "clip"),
        "cars": hub_parquet(root / "cars", cars, {"train": 16, "test": 16, **dict.fromkeys(CORRUPTIONS, 16)}),
        "country211": hub_webdataset(root / "country211", curated("country211"), {"train": 3, "test": 2}),
    }


@pytest.fixture(autouse=True)
def fresh_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prepared copy in the cache would hide which shards a load reads."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def _data(copies: dict[str, Path], name: str, *overrides: str) -> DictConfig:
    """size=base's task.data with source `name` pointed at its local copy."""
    return compose_task("clip", "size=base", f"task.data.sources.{name}.path={copies[name]}",
                        *overrides).task.data


def test_a_probe_reads_the_test_shards_alone_and_the_same_examples(copies) -> None:
    data_cfg = _data(copies, "country211", "task.data.test_size=12")
    with files_opened(copies["country211"]) as probe_files:
        probe = splits.load_test_split("country211", data_cfg, generate=None)
    assert probe_files, probe_files
    assert all(f.startswith("test/") or f == "classnames.txt" for f in probe_files), probe_files
    assert len(probe.train) == 0 and len(probe.test) == 12
    with files_opened(copies["country211"]) as run_files:
        whole = splits.load_suite(data_cfg, ["country211"], generate=None)["country211"]
    assert {f for f in run_files if f.startswith("train/")} == {"train/0.tar", "train/1.tar", "train/2.tar"}
    assert probe.test["label"] == whole.test["label"] and probe.classes == whole.classes


def test_a_run_reads_the_splits_it_uses_not_the_copys_extra_ones(copies) -> None:
    data_cfg = _data(copies, "cars", "task.data.sources.cars.prompts=null")  # data_files: null, the default
    with files_opened(copies["cars"]) as opened:
        pair = splits.load_suite(data_cfg, ["cars"], generate=None)["cars"]
    assert {Path(f).name.split("-")[0] for f in opened} == {"train", "test"}, opened
    assert (len(pair.train), len(pair.validation), len(pair.test)) == (15, 1, 16)


@pytest.mark.slow
def test_a_one_dataset_run_probes_test_splits_only_and_survives_a_broken_probe_set(copies, tiny_overrides,
                                                                                  tmp_path) -> None:
    names = ["cars", "country211", "fgvc_aircraft"]
    sources = [f"task.data.sources.{n}.path={copies[n]}" for n in ("cars", "country211")]
    cfg = compose_task("clip", "size=base", "method=lora", "dataset=cars",
                       f"task.model.path={copies['clip']}", f"task.data.datasets=[{','.join(names)}]",
                       *sources, "task.data.sources.cars.prompts=null",
                       f"task.data.sources.fgvc_aircraft.path={tmp_path / 'not_there'}",
                       f"task.data.cache_dir={tmp_path / 'regimes'}", "trainer.batch_size=8", "device=cpu",
                       *tiny_overrides)
    with files_opened(copies["country211"]) as probe_files, files_opened(copies["cars"]) as own_files:
        record = run(cfg)
    assert record["run"]["status"] == "success"
    per = record["metrics"]["forgetting_per_dataset"]
    assert isinstance(per["country211"]["before"], float) and isinstance(per["country211"]["after"], float)
    assert per["fgvc_aircraft"]["before"] is None and "not_there" in per["fgvc_aircraft"]["missing"]
    assert (record["metrics"]["forgetting"]
            == pytest.approx(per["country211"]["before"] - per["country211"]["after"]))
    assert not [f for f in probe_files if f.startswith("train/")], probe_files
    assert not [f for f in own_files if Path(f).name.split("-")[0] in CORRUPTIONS], own_files
    saved = json.loads((Path(cfg.out_dir) / "results.json").read_text())
    assert saved["metrics"]["forgetting_per_dataset"] == per
