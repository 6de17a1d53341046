"""task=clip: both CLIP towers tuned with CLIP-style contrast against class prompts, zero-shot-style eval.

Training: a batch holds images of one dataset plus that dataset's "a photo of a {class}" prompts; the
loss is cross entropy of image-to-prompt similarities (temperature = the model's logit scale). The
evaluation is the same classifier without training, so `accuracy_before` is true zero-shot accuracy.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from tasks import register
from tasks.base import Batch
from tasks.common import (
    enable_memory_savers,
    eval_mode,
    load_kwargs,
    load_pretrained,
    model_device,
    round_robin,
    to_device,
)
from tasks.data import ImageSuiteTask, prepare_images

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A dataset as tensors: normalised pixels, labels and tokenised class prompts."""

    classes: list[str]
    train_x: torch.Tensor  # or tasks.data.LazyPixels (indexes the same way)
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    prompts: dict[str, torch.Tensor]


def image_features(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """L2-normalised projected image embeddings (works for CLIPModel with adapters injected)."""
    return F.normalize(model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output), dim=-1)


def text_features(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    out = model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    return F.normalize(model.text_projection(out), dim=-1)


@register("clip")
class ClipTask(ImageSuiteTask):
    """Tiny CLIP (`tiny-clip`) over the embedded image suite; a hub CLIP id plugs into the same code."""

    def build_model(self) -> nn.Module:
        from transformers import CLIPModel

        model = load_pretrained(CLIPModel.from_pretrained, self.cfg.model.path, **load_kwargs(self.cfg.model))
        log.info("clip task: %s, datasets %s", self.cfg.model.path, ", ".join(self.datasets))
        return enable_memory_savers(model, self.cfg.model)

    @cached_property
    def tokenizer(self) -> object:
        from transformers import AutoTokenizer

        return load_pretrained(AutoTokenizer.from_pretrained, self.cfg.model.path)

    @cached_property
    def data(self) -> dict[str, Prepared]:
        out = {}
        for name, pair in self.suite.items():
            prompts = [pair.template.format(c) for c in pair.classes]
            tok = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
            out[name] = Prepared(pair.classes, *prepare_images(pair, self.processor, self.lazy),
                                 prompts={"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]})
        return out

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        data = self.data
        for name, idx in round_robin({k: len(d.train_y) for k, d in data.items()}, batch_size, generator):
            d = data[name]
            yield {"dataset": name, "pixel_values": d.train_x[idx], "labels": d.train_y[idx], **d.prompts}

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Image x class-prompt similarities scaled by the model's (learned) temperature."""
        batch = to_device(batch, model_device(model))
        img = image_features(model, batch["pixel_values"])
        txt = text_features(model, batch["input_ids"], batch["attention_mask"])
        return model.logit_scale.exp() * img @ txt.T

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.logits(model, batch), batch["labels"].to(model_device(model)))

    def evaluate(self, model: nn.Module, batch_size: int = 256) -> dict[str, float]:
        device, acc = model_device(model), {}
        with eval_mode(model):
            for name, d in self.data.items():
                p = to_device(d.prompts, device)
                txt = text_features(model, p["input_ids"], p["attention_mask"])
                correct = 0
                for i in range(0, len(d.test_y), batch_size):
                    img = image_features(model, d.test_x[i : i + batch_size].to(device))
                    correct += (img @ txt.T).argmax(-1).cpu().eq(d.test_y[i : i + batch_size]).sum().item()
                acc[name] = correct / len(d.test_y)
        return acc
