"""Dataset loading shared by the tasks: generated datasets by name, or `datasets` sources from config.

A suite entry with no `task.data.sources.<name>` is generated (tasks/images.py, tasks/sentences.py).
With a source (`path`: a `save_to_disk` folder or a hub id, plus split/column names), the same code
loads it with `load_from_disk` / `load_dataset` — the seam paper-scale configs plug into.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from omegaconf import DictConfig, OmegaConf

from tasks import images
from tasks.augment import Augment, batch_rng, example_rngs
from tasks.base import EVAL_SPLITS, Task
from tasks.common import hub_revision, load_pretrained, selected
from tasks.regimes import apply_regime, regime_name, steps_for_epochs

log = logging.getLogger(__name__)


@dataclass
class SplitPair:
    """One dataset of a suite: train/test `datasets.Dataset`s plus what prompts need."""

    name: str
    classes: list[str]
    template: str
    train: Dataset
    test: Dataset
    source: DictConfig | None = None  # the `task.data.sources.<name>` entry (None: generated)
    templates: list[str] | None = None  # the dataset's prompt ensemble (None: just `template`)
    validation: Dataset | None = None  # hyper-parameter selection split, never part of train (see hold_out)
    # the hub commit the data came from (source_revision); None: local or generated
    revision: str | None = None

    @property
    def ensemble(self) -> list[str]:
        return list(self.templates or [self.template])

    def scored(self, split: str) -> Dataset:
        """The split an evaluation scores: `test` (the reported one) or `validation` (for tuning)."""
        if split == "test":
            return self.test
        if split != "validation":
            raise ValueError(f"task.data.eval_split={split!r} is not a split; "
                             f"valid: {', '.join(EVAL_SPLITS)}")
        if self.validation is None:
            raise ValueError(f"dataset {self.name!r} has no validation split (task.data.val_fraction is 0); "
                             "set task.data.val_fraction > 0 or a source's val_split")
        return self.validation


def load_suite(
    data_cfg: DictConfig, names: list[str], generate: Callable[[str, str, int, int], Dataset],
    templates: dict[str, str] | None = None,
) -> dict[str, SplitPair]:
    """Load every dataset in `names`, from its configured source or from `generate(name, split, n, seed)`."""
    sources = data_cfg.get("sources") or {}
    out = {}
    for name in names:
        if name in sources:
            pair = _from_source(name, sources[name], data_cfg)
        else:
            pair = _generated(name, data_cfg, generate, (templates or {}).get(name, "{}"))
        # after the hold-out: regimes never see validation
        pair.train = apply_regime(name, pair.train, data_cfg)
        out[name] = pair
    return out


def _generated(name: str, data_cfg: DictConfig, generate: Callable[[str, str, int, int], Dataset],
               template: str) -> SplitPair:
    """A generated dataset; its validation split is a hold-out of the generated train split, so the
    generated test split is exactly what it was before validation splits existed. With
    `task.data.generated_validation` the held-out examples are replaced by the generator's own
    "validation" split of the same size (the language suite: held-out words, disjoint from train's and
    test's)."""
    train = generate(name, "train", int(data_cfg.train_size), data_seed_of(data_cfg))
    test = generate(name, "test", int(data_cfg.test_size), data_seed_of(data_cfg))
    train, validation = hold_out(name, train, {}, data_cfg)
    if validation is not None and data_cfg.generated_validation:   # held-out words, like test
        validation = generate(name, "validation", len(validation), data_seed_of(data_cfg))
    return SplitPair(name, train.features["label"].names, template, train, test, validation=validation)


def hold_out(name: str, train: Dataset, src: Any, data_cfg: DictConfig) -> tuple[Dataset, Dataset | None]:
    """(train, validation): a seeded hold-out of train, removed from it for every run (tuning and final runs
    train on the same examples). Its size is the source's `val_size`, else `val_fraction` (the source's,
    else task.data's) of train, at most task.data.val_max; drawn by `holdout_indices` at
    task.data.val_seed."""
    size = validation_size(len(train), src, data_cfg)
    if size == 0:
        return train, None
    if size >= len(train):
        raise ValueError(f"dataset {name!r}: a validation hold-out of {size} leaves none of its {len(train)} "
                         "train examples; lower task.data.val_fraction (or the source's val_size)")
    keep, held = holdout_indices(len(train), size, int(data_cfg.val_seed))
    log.info("%s: %d of %d train examples held out for validation (seed %d)", name, size, len(train),
             int(data_cfg.val_seed))
    return train.select(keep), train.select(held)


def validation_size(n: int, src: Any, data_cfg: DictConfig) -> int:
    """Examples held out of `n`: the source's `val_size`, else floor(fraction x n) capped at `val_max` (at
    least 1 when the fraction is positive), as the official split_train_into_train_val sizes it (RandLoRA
    vision_language/src/datasets/registry.py:58-63, get_dataset val_fraction=0.1, max_val_samples=5000
    :170)."""
    if src.get("val_size") is not None:
        return int(src.val_size)
    fraction = float(src.get("val_fraction") if src.get("val_fraction") is not None
                     else data_cfg.val_fraction)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"dataset validation fraction {fraction} is not valid: use a number in [0, 1)")
    if fraction == 0.0:
        return 0
    return max(1, min(int(n * fraction), int(data_cfg.val_max)))


def holdout_indices(n: int, size: int, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held-out) row indices, each sorted: torch's random_split(range(n), [n - size, size]) with a
    generator seeded `seed` (one randperm, the last `size` held out), as the official code draws
    "<Dataset>Val"
    (RandLoRA vision_language/src/datasets/registry.py:65-71, seed 0). Depends on n and seed only."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[: n - size]), sorted(perm[n - size :])


def data_seed_of(data_cfg: DictConfig) -> int:
    """Seed of generated data: fixed by config, not the run seed, so test sets match across seeds."""
    return int(data_cfg.get("seed", 0))


def _from_source(name: str, src: DictConfig, data_cfg: DictConfig) -> SplitPair:
    """A real dataset: `path` (save_to_disk folder or hub id, optional `config`), `train_split`,
    `test_split` (null: a seeded `test_fraction` of train), `val_split` (the dataset's own validation split;
    absent: a seeded hold-out of train, see `hold_out`), `image_column` / `text_column` / `text_pair_column`,
    `label_column`, `label_offset` (added to every label: -1 for 1-based labels), `name_column` (a column
    naming each row's class, checked against the prompts' names), and `classes` or `classes_file` (else the
    ClassLabel names). Every split's labels are checked against the class count."""
    train_split, test_split, val_split = (src.get("train_split", "train"), src.get("test_split", "test"),
                                          src.get("val_split"))
    dd = open_source(name, src, splits=[s for s in (train_split, test_split, val_split) if s is not None])
    _check_splits(name, src, dd, train_split, test_split, val_split)
    train, test, validation = _source_splits(name, src, dd, data_cfg, train_split, test_split, val_split)
    train, test, validation = (standard_columns(ds, src) for ds in (train, test, validation))
    classes = _label_classes(name, src, train)
    check_labels(name, src, classes, {train_split: train, test_split or "test": test,
                                      val_split or "validation": validation})
    train, test = cap(train, data_cfg.get("train_size")), cap(test, data_cfg.get("test_size"))
    validation = cap(validation, data_cfg.get("test_size"))  # an evaluation split: the same cap as test
    return _source_pair(name, src, classes, train, test, validation)


def _label_classes(name: str, src: DictConfig, ds: Dataset) -> list[str]:
    """Class names in label order, from the source's settings and the split's own label names."""
    feature = ds.features.get("label")
    return source_classes(name, src, list(feature.names) if hasattr(feature, "names") else None)


def _source_pair(name: str, src: DictConfig, classes: list[str], train: Dataset, test: Dataset,
                 validation: Dataset | None) -> SplitPair:
    templates = source_templates(name, src)
    return SplitPair(name, classes, templates[0], train, test, src, templates, validation,
                     revision=source_revision(src))


def load_test_split(name: str, data_cfg: DictConfig, generate: Callable[[str, str, int, int], Dataset],
                    template: str = "{}") -> SplitPair:
    """One dataset's test split alone (capped at task.data.test_size), for a probe that only scores it: no
    train shard is downloaded, prepared or generated and no validation hold-out is drawn; its train split is
    empty. The same examples as `load_suite`'s test split (the same split, the same seeded cap)."""
    src = (data_cfg.get("sources") or {}).get(name)
    if src is None:
        test = generate(name, "test", int(data_cfg.test_size), data_seed_of(data_cfg))
        return SplitPair(name, test.features["label"].names, template, test.select([]), test)
    train_split, test_split = src.get("train_split", "train"), src.get("test_split", "test")
    read = test_split if test_split is not None else train_split  # no test split: its hold-out of train
    dd = open_source(name, src, splits=[read])
    _check_splits(name, src, dd, read, None, None)
    test = shift_labels(dd[read], src)
    test = standard_columns(test if test_split is not None else _test_hold_out(test, src)[1], src)
    classes = _label_classes(name, src, test)
    check_labels(name, src, classes, {read: test})
    test = cap(test, data_cfg.get("test_size"))
    return _source_pair(name, src, classes, test.select([]), test, None)


def _test_hold_out(train: Dataset, src: DictConfig) -> tuple[Dataset, Dataset]:
    """(train, test) of a copy with no test split (e.g. Caltech101): a fixed seeded `test_fraction` of
    train."""
    parts = train.train_test_split(test_size=float(src.get("test_fraction", 0.2)), seed=0)
    return parts["train"], parts["test"]


def _source_splits(name: str, src: DictConfig, dd: DatasetDict, data_cfg: DictConfig, train_split: str,
                   test_split: str | None, val_split: str | None) -> tuple[Dataset, Dataset, Dataset | None]:
    """(train, test, validation), labels already shifted by `label_offset` (before any hold-out, so only the
    label column is rewritten): test a seeded `test_fraction` of train when the copy has none (e.g.
    Caltech101), validation the copy's own split or a seeded hold-out of train."""
    train = shift_labels(dd[train_split], src)
    if test_split is None:
        train, test = _test_hold_out(train, src)
    else:
        test = shift_labels(dd[test_split], src)
    if val_split:
        return train, test, shift_labels(dd[val_split], src)
    train, validation = hold_out(name, train, src, data_cfg)
    return train, test, validation


def _check_splits(name: str, src: DictConfig, dd: DatasetDict, train_split: str, test_split: str | None,
                  val_split: str | None) -> None:
    """One clear error for a split the copy lacks, or an own validation split that is the test split."""
    for split in (train_split, test_split, val_split):
        if split is not None and split not in dd:
            raise KeyError(f"dataset {name!r} at {src.path!r} has no split {split!r}; "
                           f"it has {', '.join(dd)}. "
                           f"Set task.data.sources.{name}.train_split / test_split / val_split.")
    if val_split is not None and val_split in (train_split, test_split):
        raise ValueError(f"dataset {name!r}: val_split {val_split!r} is also its train or test split; remove "
                         f"task.data.sources.{name}.val_split to hold out part of train instead")


def standard_columns(ds: Dataset | None, src: DictConfig) -> Dataset | None:
    """The source's label / image / text columns renamed to the names the tasks read."""
    renames = [(src.get("label_column"), "label"), (src.get("image_column"), "image"),
               (src.get("text_column"), "text"), (src.get("text_pair_column"), "text_pair")]
    for col, std in renames:
        if ds is not None and col and col != std:
            ds = ds.rename_column(col, std)
    return ds


def shift_labels(ds: Dataset | None, src: DictConfig) -> Dataset | None:
    """The source's label column plus its `label_offset` (e.g. -1 for a copy whose integer labels are
    1-based), so every task reads labels in [0, num_classes). On a split as loaded (no index mapping) only the
    label column is replaced; images are not rewritten."""
    offset, column = int(src.get("label_offset") or 0), src.get("label_column") or "label"
    if ds is None or offset == 0:
        return ds
    shifted = (np.asarray(ds[column], dtype=np.int64) + offset).tolist()
    return ds.remove_columns(column).add_column(column, shifted)


def check_label_range(name: str, split: str, ds: Dataset | None, num_classes: int) -> None:
    """One clear error for a label outside [0, num_classes): an off-by-one or a names list of the wrong
    length would otherwise be an index error on the accelerator, or prompts silently shifted by one.
    Regression targets (no class names) are not checked."""
    if ds is None or num_classes == 0 or len(ds) == 0:
        return
    ys = np.asarray(ds["label"])
    problem = label_range_problem(name, split, int(ys.min()), int(ys.max()), num_classes)
    if problem:
        raise ValueError(problem)


def label_names_problem(name: str, split: str, pairs: list[tuple[int, str]], classes: list[str],
                        column: str) -> str | None:
    """The one-line problem of a copy whose rows name their class (`name_column`, e.g. Caltech-256's `text`)
    when most labels' prompt names disagree with those row names -- labels shifted (a missing
    `label_offset`) or a names list in another order -- or None. Half of the distinct labels, not all,
    must agree: row names may be spelled apart from the official ones (`bonsai-101`, `bonsai`)."""
    seen = dict(sorted(set(pairs)))
    wrong = [(y, n) for y, n in seen.items() if 0 <= y < len(classes)
             and not set(_name_keys(classes[y])) & set(_name_keys(str(n)))]
    if 2 * len(wrong) <= len(seen):
        return None
    y, row_name = wrong[0]
    return (f"dataset {name!r}, split {split!r}: {len(wrong)} of {len(seen)} labels disagree with their "
            f"{column!r} names (label {y} is named {row_name!r} but prompted as {classes[y]!r}): "
            f"the labels are "
            f"shifted or the names are in another order; set task.data.sources.{name}.label_offset or "
            f"task.data.sources.{name}.classes=[...] in label order")


def check_labels(name: str, src: DictConfig, classes: list[str], splits: dict[str, Dataset | None]) -> None:
    """Every split's labels in [0, len(classes)) and, with a `name_column`, named as the prompts name them:
    one clear ValueError otherwise, before anything is built on them."""
    for split, ds in splits.items():
        check_label_range(name, split, ds, len(classes))
        check_label_names(name, split, ds, classes, src.get("name_column"))


def check_label_names(name: str, split: str, ds: Dataset | None, classes: list[str],
                      column: str | None) -> None:
    """One clear error when a copy's own row names contradict the prompts' class names (see above)."""
    if ds is None or not column or not classes or len(ds) == 0:
        return
    pairs = list(zip(np.asarray(ds["label"]).tolist(), ds[column], strict=True))
    problem = label_names_problem(name, split, pairs, classes, column)
    if problem:
        raise ValueError(problem)


def label_range_problem(name: str, split: str, low: int, high: int, num_classes: int) -> str | None:
    """The one-line problem of labels spanning low..high with `num_classes` class names, or None if they fit
    [0, num_classes); shared by the run (check_label_range) and runners.preflight."""
    if low >= 0 and high < num_classes:
        return None
    where = (f"dataset {name!r}, split {split!r}: label {low if low < 0 else high} "
             f"is outside [0, {num_classes}) "
             f"(labels span {low}..{high}, {num_classes} class names)")
    if low < 0:  # -1 marks an unlabelled example (GLUE's hidden test labels)
        return (f"{where}; negative labels mark unlabelled examples: "
                f"point task.data.sources.{name}.train_split "
                "/ test_split / val_split at a labelled split")
    offset = f"={-low} (labels start at {low})" if low > 0 else ""
    return (f"{where}; set task.data.sources.{name}.label_offset{offset} "
            f"or task.data.sources.{name}.classes=[...] "
            "naming every label in order")


def cap(ds: Dataset | None, size: int | None) -> Dataset | None:
    """At most `size` examples (a fixed seeded subset: quick runs, smoke tests); null = all."""
    if ds is None or size is None or len(ds) <= int(size):
        return ds
    return ds.shuffle(seed=0).select(range(int(size)))


def open_source(name: str, src: DictConfig, key: str | None = None,
                splits: list[str] | None = None) -> DatasetDict:
    """`load_from_disk` for a `save_to_disk` folder, the json loader for a local .json/.jsonl file (its one
    split named `json_split`), `load_dataset` for a hub id or a local folder laid out as the hub repo is (a
    clone); one clear error otherwise, naming the config `key` to override (default task.data.sources.<name>).
    `splits`: the only splits to download and prepare (`load_dataset` prepares every split it is given files
    for, whatever split is asked: datasets 5.2 src/datasets/load.py `load_dataset`); None: all of them."""
    key = key or f"task.data.sources.{name}"
    path = src.get("path")
    if not path:
        raise FileNotFoundError(
            f"dataset {name!r} has no hub id configured (no verified public copy); prepare it locally "
            f"(DatasetDict.save_to_disk, or a .json file) and set {key}.path=<folder or file>.")
    path = str(path)
    try:
        if Path(path).is_file() and path.endswith((".json", ".jsonl")):  # e.g. LLM-Adapters' test.json files
            dd = load_dataset("json", data_files={str(src.get("json_split", "train")): path})
        else:
            dd = load_from_disk(path) if is_saved_copy(path) else load_dataset(path, src.get("config"),
                                                                                **hub_kwargs(src, splits))
    except Exception as e:  # network, missing files, wrong id: one clear line
        if is_script_error(e):
            raise RuntimeError(
                f"dataset {name!r} at {path!r} is a script-based hub repo, which datasets>=4 no longer "
                f"loads: point {key}.path at a parquet/webdataset copy or a local save_to_disk folder") from e
        raise FileNotFoundError(
            f"could not load dataset {name!r} from {path!r} ({type(e).__name__}): no such local folder and "
            f"could not be reached on the Hugging Face hub. Set {key}.path to a "
            f"save_to_disk copy (made where the hub is reachable: "
            f"datasets.load_dataset({path!r}, {src.get('config')!r}).save_to_disk(<folder>))."
        ) from e
    if not isinstance(dd, DatasetDict):
        raise TypeError(f"dataset {name!r} at {path!r} has no splits; expected a DatasetDict")
    return dd


PROMPTS_DIR = Path(__file__).resolve().parent / "assets" / "prompts"


def prompt_set(name: str, src: DictConfig) -> dict[str, Any] | None:
    """The source's entry in `tasks/assets/prompts/<prompts>.json` (curated class names + template list,
    each with its public source), when the source names a prompt set; else None."""
    if not src.get("prompts"):
        return None
    path = PROMPTS_DIR / f"{src.prompts}.json"
    table = json.loads(path.read_text())
    key = str(src.get("prompts_key") or name)  # prompts_key: another dataset's entry
    if key not in table:
        raise KeyError(f"prompt set {src.prompts!r} ({path}) has no entry {key!r}; it has "
                       f"{', '.join(k for k in table if not k.startswith('_'))}")
    return table[key]


def source_templates(name: str, src: DictConfig) -> list[str]:
    """Prompt templates: config `templates` (or `template`), else the prompt set's list."""
    if src.get("templates"):
        return [str(t) for t in src.templates]
    if src.get("template"):
        return [str(src.template)]
    entry = prompt_set(name, src)
    return list(entry["templates"]) if entry else ["a photo of a {}."]


def hub_kwargs(src: DictConfig, splits: list[str] | None = None) -> dict[str, Any]:
    """`load_dataset` kwargs of a hub source: its pinned `revision`, and the `data_files` of `splits` only
    (all splits' files when `splits` is None)."""
    files = split_files(src, splits)
    kwargs: dict[str, Any] = {"data_files": files} if files else {}
    return {**kwargs, "revision": str(src.revision)} if src.get("revision") else kwargs


def split_files(src: DictConfig, splits: list[str] | None) -> dict[str, Any] | None:
    """Each split's files, restricted to `splits`: the source's `data_files` patterns (webdataset split
    folders), else the files the repo itself assigns each split (its card's `configs`, else the hub's file
    naming convention), which `load_dataset_builder` resolves from the file listing without downloading
    data. A split the repo lacks is left out here and named by `_check_splits`. None: no restriction."""
    if src.get("data_files"):
        files: dict[str, Any] | None = {str(k): str(v) for k, v in src.data_files.items()}
    else:
        files = _repo_split_files(src) if splits is not None else None
    if files is None or splits is None or not set(splits) & set(files):
        return files
    return {s: f for s, f in files.items() if s in splits}


def _repo_split_files(src: DictConfig) -> dict[str, list[str]] | None:
    """{split: resolved files} of a hub repo (or a local clone of one); None where the builder names none."""
    from datasets import load_dataset_builder

    kwargs = {"revision": str(src.revision)} if src.get("revision") else {}
    data_files = load_dataset_builder(str(src.path), src.get("config"), **kwargs).config.data_files
    return {str(split): list(files) for split, files in data_files.items()} if data_files else None


def is_saved_copy(path: str) -> bool:
    """A `save_to_disk` folder (DatasetDict or Dataset), as opposed to a hub id or a clone of a hub repo."""
    return Path(path, "dataset_dict.json").is_file() or Path(path, "state.json").is_file()


def source_revision(src: DictConfig) -> str | None:
    """What results.json records as the source's revision: None for a local folder or file, else the hub
    commit it resolves to (the pinned `revision`, if the source sets one, or the default branch)."""
    return hub_revision(str(src.path), "dataset", str(src.revision) if src.get("revision") else None)


def is_script_error(err: BaseException) -> bool:
    """datasets >= 4 refuses hub repos that still ship a loading script (a RuntimeError whose message
    says dataset scripts are no longer supported; datasets 4.0.0 src/datasets/load.py)."""
    return isinstance(err, RuntimeError) and "scripts are no longer supported" in str(err)


def source_classes(name: str, src: DictConfig, label_names: list[str] | None) -> list[str]:
    """Class names for prompts, in label order: config `classes`; else the prompt set's curated names
    aligned to the dataset's own label names (`classes_file`, else the ClassLabel names); else those
    names with underscores as spaces. An empty list means a regression target (GLUE STS-B)."""
    if src.get("classes"):
        return [str(c) for c in src.classes]
    if src.get("classes_file"):
        label_names = _read_classes_file(name, src)
    entry = prompt_set(name, src)
    if entry is not None:
        return align_classes(name, list(entry["classes"]), label_names)
    return [str(c).replace("_", " ") for c in label_names or []]


def _name_keys(name: str) -> list[str]:
    """Spelling-independent keys of a class name: the words of `001.Black_footed_Albatross`,
    `Black-footed Albatross` or `AM General Hummer SUV 2000` / `2000 AM General Hummer SUV` compare
    equal; so do the space- and punctuation-free forms (`diningtable`, `dining table`: PASCAL VOC's raw
    names in clip-benchmark/wds_voc2007's classnames.txt); a WordNet synonym list (`tench, Tinca tinca`)
    also matches its first synonym."""
    def key(text: str) -> str:
        return " ".join(sorted(re.sub(r"[_\-/,.'()]+", " ", _bare(text)).split()))

    def compact(text: str) -> str:  # raw VOC `diningtable` == curated `dining table`
        return re.sub(r"[^0-9a-z]+", "", _bare(text))
    first = name.split(",")[0]
    return list(dict.fromkeys([key(name), key(first), compact(name), compact(first)]))


def _bare(text: str) -> str:
    """Lower case, without a leading `001.`-style index (CUB-200's folder names)."""
    return re.sub(r"^\d+\.", "", text.strip().lower())


def align_classes(name: str, curated: list[str], label_names: list[str] | None,
                  max_unmatched: float = 0.05) -> list[str]:
    """`curated` reordered to the dataset's label order by matching names (see `_name_keys`).

    With no label names (integer labels) the curated order is taken as the label order. A few names
    that match nothing (a typo such as CIFAR-100's `cra` for `crab` in the hub copies) take the
    remaining curated names in order; more than `max_unmatched` of them is a ValueError, since the
    lists then describe different label sets."""
    if not label_names:
        return list(curated)
    if len(label_names) != len(curated):
        raise ValueError(f"dataset {name!r} has {len(label_names)} labels but its curated class names "
                         f"list {len(curated)}; set task.data.sources.{name}.classes=[...] or prompts=null")
    free: dict[str, list[int]] = {}
    for i, c in enumerate(curated):
        for k in _name_keys(c):
            free.setdefault(k, []).append(i)
    taken: set[int] = set()
    out: list[str | None] = []
    for label in label_names:
        i = next((i for k in _name_keys(str(label)) for i in free.get(k, []) if i not in taken), None)
        taken.add(i) if i is not None else None
        out.append(curated[i] if i is not None else None)
    rest = iter(c for i, c in enumerate(curated) if i not in taken)
    unmatched = [str(label) for label, c in zip(label_names, out, strict=True) if c is None]
    if len(unmatched) > max_unmatched * len(curated):
        raise ValueError(f"curated class names of {name!r} do not match the dataset's label names "
                         f"({len(unmatched)} of {len(curated)} unmatched, e.g. {unmatched[:3]}); set "
                         f"task.data.sources.{name}.classes=[...] in label order, or prompts=null")
    if unmatched:
        log.info("%s: label names %s matched no curated name; given the remaining ones in order",
                 name, unmatched)
    return [c if c is not None else next(rest) for c in out]


def _read_classes_file(name: str, src: DictConfig) -> list[str]:
    local = Path(str(src.path)) / str(src.classes_file)
    if not local.is_file():
        try:
            from huggingface_hub import hf_hub_download

            local = Path(hf_hub_download(str(src.path), str(src.classes_file), repo_type="dataset"))
        except Exception as e:
            raise FileNotFoundError(
                f"could not read class names of {name!r}: {src.classes_file!r} is neither in "
                f"{src.path!r} nor "
                f"reachable on the hub. Set task.data.sources.{name}.classes=[...]") from e
    return [line.strip() for line in local.read_text().splitlines() if line.strip()]


def image_array(ds: Dataset, column: str = "image") -> np.ndarray:
    """(N, H, W, 3) uint8 from an Array3D column or a column of (same-sized) PIL images."""
    first = ds[0][column]
    if hasattr(first, "convert"):
        return np.stack([np.asarray(im.convert("RGB")) for im in ds[column]])
    return ds.with_format("numpy")[:][column].astype(np.uint8)


def pixel_values(ds: Dataset, processor: Any) -> torch.Tensor:
    """Images -> normalised (N, 3, H, W) float tensor, as the model's image processor would.

    Images already at the processor's crop size (the tiny suite) are normalised in one vectorised step;
    others (hub datasets: PIL images of any size and mode) go through the processor itself."""
    if len(ds) == 0:  # a probe's unread train split (load_test_split)
        return torch.empty(0)
    first = ds[0]["image"]
    if hasattr(first, "convert"):
        return processor(images=[im.convert("RGB") for im in ds["image"]],
                         return_tensors="pt")["pixel_values"]
    arr = image_array(ds)
    crop = getattr(processor, "crop_size", None) or {}
    if arr.shape[1] == crop.get("height") and arr.shape[2] == crop.get("width"):
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
        mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
        return (x - mean) / std
    return processor(images=list(arr), return_tensors="pt")["pixel_values"]


class LazyPixels:
    """Pixels of a split processed per batch: hub-scale datasets (ImageNet: 1.28M images) do not fit in
    memory as tensors. Indexes like a tensor (`x[idx_tensor]`, `x[i:j]`), so tasks need not care.
    With `augment` (training splits of the paper suites) each batch is randomly cropped and flipped,
    then only rescaled and normalised by the processor."""

    def __init__(self, ds: Dataset, processor: Any, augment: Augment | None = None, seed: int = 0) -> None:
        self.ds, self.processor, self.augment, self.seed = ds, processor, augment, seed

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, idx: slice | torch.Tensor) -> torch.Tensor:
        rows = range(*idx.indices(len(self))) if isinstance(idx, slice) else torch.as_tensor(idx).tolist()
        part = self.ds.select(list(rows))
        if self.augment is None:
            return pixel_values(part, self.processor)
        images = self.augment(part["image"], batch_rng(self.seed, list(rows)))
        return self.processor(images=images, do_resize=False, do_center_crop=False,
                              return_tensors="pt")["pixel_values"]

    def training(self, rows: list[int], epoch: int) -> torch.Tensor:
        """Pixels of training examples `rows` in `epoch`: each image augmented by its own
        (seed, epoch, index) generator, so a batch is the same in any worker, rank or resumed run."""
        if self.augment is None:
            return self[torch.as_tensor(rows, dtype=torch.long)]
        images = self.augment(self.ds.select(rows)["image"], example_rngs(self.seed, epoch, rows))
        return self.processor(images=images, do_resize=False, do_center_crop=False,
                              return_tensors="pt")["pixel_values"]


def train_pixels(x: torch.Tensor | LazyPixels, rows: list[int], epoch: int) -> torch.Tensor:
    """Training pixels of `rows` from an eager tensor (taken as is) or a `LazyPixels` (processed now)."""
    if isinstance(x, LazyPixels):
        return x.training(rows, epoch)
    return x[torch.as_tensor(rows, dtype=torch.long)]


def labels(ds: Dataset) -> torch.Tensor:
    return torch.as_tensor(np.asarray(ds["label"]), dtype=torch.long)


def prepare_images(pair: SplitPair, processor: object, lazy: bool = False, augment: Augment | None = None,
                   seed: int = 0, eval_split: str = "test") -> tuple[Any, ...]:
    """(train_x, train_y, eval_x, eval_y) of one dataset, eval_* being `eval_split` (test or validation);
    x are tensors, or `LazyPixels` when `lazy` (only lazy training splits are augmented: the tiny suite's
    eager tensors are used as they are)."""
    scored = pair.scored(eval_split)
    if not lazy:
        return (pixel_values(pair.train, processor), labels(pair.train),
                pixel_values(scored, processor), labels(scored))
    return (LazyPixels(pair.train, processor, augment, seed), labels(pair.train),
            LazyPixels(scored, processor), labels(scored))


class EpochPlanMixin:
    """`planned_steps`: trainer.max_steps derived from epochs, for tasks whose config names them.

    Epochs come from `task.data.epochs` (one number for every dataset) or each source's `epochs`
    (the paper's per-dataset table); in a k-shot regime from `task.data.shot_epochs`, with at least
    `task.data.min_steps_per_epoch` steps per epoch (the RandLoRA over-sampling rule)."""

    cfg: DictConfig

    @property
    def dataset_revisions(self) -> dict[str, str | None]:
        """Each dataset's hub revision (None: local or generated data), recorded in results.json."""
        return {name: pair.revision for name, pair in self.suite.items()}  # type: ignore[attr-defined]

    def train_sizes(self) -> dict[str, int]:
        return {name: len(pair.train) for name, pair in self.suite.items()}  # type: ignore[attr-defined]

    def eval_examples(self) -> dict[str, int]:
        split = self.eval_split  # type: ignore[attr-defined]
        return {name: len(pair.scored(split)) for name, pair in self.suite.items()}  # type: ignore[attr-defined]

    def planned_steps(self, batch_size: int, grad_accum: int = 1) -> int | None:
        data = self.cfg.data
        shots = data.get("shots")
        sources = data.get("sources") or {}
        epochs = {}
        for name in self.datasets:  # type: ignore[attr-defined]
            per_source = (sources.get(name) or {}).get("epochs")
            value = data.get("shot_epochs") if shots else (data.get("epochs") or per_source)
            if value is None:
                return None  # no epochs configured: trainer.max_steps decides
            epochs[name] = value
        min_steps = int(data.get("min_steps_per_epoch", 0) or 0) if shots else 0
        return steps_for_epochs(self.train_sizes(), epochs, batch_size * grad_accum, min_steps)

    @property
    def regime(self) -> str:
        return regime_name(self.cfg.data.get("shots"), self.cfg.data.get("fraction"))


class ImageSuiteTask(EpochPlanMixin, Task):
    """Shared by clip and vision: the image suite of `task.data`, restricted by `task.dataset`."""

    @property
    def datasets(self) -> list[str]:
        return selected(list(self.cfg.data.datasets), self.cfg.get("dataset"))

    @cached_property
    def processor(self) -> object:
        from transformers import AutoImageProcessor

        processor = self.cfg.model.get("processor")  # e.g. DINOv2 with CLIP's statistics (vision/base.yaml)
        overrides = OmegaConf.to_container(processor) if processor is not None else {}
        return load_pretrained(AutoImageProcessor.from_pretrained, self.cfg.model.path, **overrides)

    @cached_property
    def augment(self) -> Augment | None:
        """Training augmentation (`task.data.augment`); None for the tiny suite."""
        from tasks.augment import from_config

        return from_config(self.cfg.data.get("augment"), self.processor)

    @property
    def lazy(self) -> bool:
        """Process pixels per batch (hub datasets) instead of once up front (the tiny suite)."""
        return self.cfg.data.get("preprocess", "eager") == "lazy"

    @cached_property
    def suite(self) -> dict[str, SplitPair]:
        templates = {k: s.template for k, s in images.SPECS.items()}
        return load_suite(self.cfg.data, self.datasets, images.make_split, templates)
