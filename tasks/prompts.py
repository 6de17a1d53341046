"""What a dataset's prompts are made of: its class names in label order and its templates.

Class names come from the source's `classes`, or from a curated prompt set
(tasks/assets/prompts/<prompts>.json, the official code's names and templates) aligned to the copy's own
label names (`classes_file` or the ClassLabel names), or from those label names themselves.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

log = logging.getLogger(__name__)


PROMPTS_DIR = Path(__file__).resolve().parent / "assets" / "prompts"


def prompt_set(name: str, src: DictConfig) -> dict[str, Any] | None:
    """The source's entry in `tasks/assets/prompts/<prompts>.json` (curated class names + template list,
    each with its public source), when the source names a prompt set; else None."""
    if not src.prompts:
        return None
    path = PROMPTS_DIR / f"{src.prompts}.json"
    table = json.loads(path.read_text())
    key = str(src.prompts_key or name)  # prompts_key: another dataset's entry
    if key not in table:
        raise KeyError(f"prompt set {src.prompts!r} ({path}) has no entry {key!r}; it has "
                       f"{', '.join(k for k in table if not k.startswith('_'))}")
    return table[key]


def source_templates(name: str, src: DictConfig) -> list[str]:
    """Prompt templates: config `templates` (or `template`), else the prompt set's list."""
    if src.templates:
        return [str(t) for t in src.templates]
    if src.template:
        return [str(src.template)]
    entry = prompt_set(name, src)
    return list(entry["templates"]) if entry else ["a photo of a {}."]


def templates_for(choice: str, ensemble: list[str]) -> list[str]:
    """The templates a prompt choice (`task.objective.prompts.*`) stands for: `ensemble` (all of the
    dataset's templates), `dataset` (its first), or a literal template."""
    if choice == "ensemble":
        return list(ensemble)
    if choice == "dataset":
        return list(ensemble[:1])
    if "{}" not in choice:
        raise ValueError(f"prompt {choice!r} is neither 'ensemble', 'dataset' nor a template with {{}}")
    return [choice]


def source_classes(name: str, src: DictConfig, label_names: list[str] | None) -> list[str]:
    """Class names for prompts, in label order: config `classes`; else the prompt set's curated names
    aligned to the dataset's own label names (`classes_file`, else the ClassLabel names); else those
    names with underscores as spaces. An empty list means a regression target (GLUE STS-B)."""
    if src.classes:
        return [str(c) for c in src.classes]
    if src.classes_file:
        label_names = _read_classes_file(name, src)
    entry = prompt_set(name, src)
    if entry is not None:
        return align_classes(name, list(entry["classes"]), label_names)
    return [str(c).replace("_", " ") for c in label_names or []]


def align_classes(name: str, curated: list[str], label_names: list[str] | None,
                  max_unmatched: float = 0.05) -> list[str]:
    """`curated` reordered to the dataset's label order by matching names (see `name_keys`).

    With no label names (integer labels) the curated order is taken as the label order. A few names
    that match nothing (a typo such as CIFAR-100's `cra` for `crab` in the hub copies) take the
    remaining curated names in order; more than `max_unmatched` of them is a ValueError, since the
    lists then describe different label sets."""
    if not label_names:
        return list(curated)
    if len(label_names) != len(curated):
        raise ValueError(f"dataset {name!r} has {len(label_names)} labels but its curated class names "
                         f"list {len(curated)}; set task.data.sources.{name}.classes=[...] or prompts=null")
    matched = _match_names(curated, label_names)
    unmatched = [str(label) for label, i in zip(label_names, matched, strict=True) if i is None]
    if len(unmatched) > max_unmatched * len(curated):
        raise ValueError(f"curated class names of {name!r} do not match the dataset's label names "
                         f"({len(unmatched)} of {len(curated)} unmatched, e.g. {unmatched[:3]}); set "
                         f"task.data.sources.{name}.classes=[...] in label order, or prompts=null")
    if unmatched:
        log.info("%s: label names %s matched no curated name; given the remaining ones in order",
                 name, unmatched)
    taken = set(matched)
    rest = iter(c for i, c in enumerate(curated) if i not in taken)
    return [curated[i] if i is not None else next(rest) for i in matched]


def _match_names(curated: list[str], label_names: list[str]) -> list[int | None]:
    """Per label name, the index of the first curated name not yet taken that shares a key with it (None:
    no match)."""
    free: dict[str, list[int]] = {}
    for i, c in enumerate(curated):
        for k in name_keys(c):
            free.setdefault(k, []).append(i)
    taken: set[int] = set()
    matched: list[int | None] = []
    for label in label_names:
        i = next((i for k in name_keys(str(label)) for i in free.get(k, []) if i not in taken), None)
        if i is not None:
            taken.add(i)
        matched.append(i)
    return matched


def name_keys(name: str) -> list[str]:
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
