"""task=vision: image classification with a pretrained ViT-style backbone and a linear head per dataset.

The tiny suite uses the vision tower of the embedded tiny CLIP (loaded with CLIPVisionModel from the
same folder); another model folder or hub id (e.g. DINOv2, google/vit) loads with AutoModel.
`accuracy_before` is the untrained head; method=none trains only the head (a linear probe).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from tasks import register
from tasks.base import Batch
from tasks.common import HeadedModel, eval_mode, load_pretrained, model_device, round_robin
from tasks.data import ImageSuiteTask, prepare_images

log = logging.getLogger(__name__)


def load_vision_backbone(path: str) -> nn.Module:
    """The image encoder of `path`: CLIP checkpoints give their vision tower, others AutoModel."""
    from transformers import AutoConfig, AutoModel, CLIPVisionModel

    config = load_pretrained(AutoConfig.from_pretrained, path)
    loader = CLIPVisionModel.from_pretrained if config.model_type == "clip" else AutoModel.from_pretrained
    return load_pretrained(loader, path)


def hidden_size(backbone: nn.Module) -> int:
    cfg = backbone.config
    return int(getattr(cfg, "hidden_size", None) or cfg.vision_config.hidden_size)


@register("vision")
class VisionTask(ImageSuiteTask):
    """Backbone + `heads.<dataset>` linear heads over the image suite; top-1 per dataset."""

    def build_model(self) -> nn.Module:
        backbone = load_vision_backbone(self.cfg.model.path)
        classes = {name: len(pair.classes) for name, pair in self.suite.items()}
        log.info("vision task: %s, datasets %s", self.cfg.model.path, ", ".join(classes))
        return HeadedModel(backbone, hidden_size(backbone), classes, pool="pooler",
                           seed=int(self.cfg.data.get("seed", 0)))

    @cached_property
    def data(self) -> dict[str, tuple[torch.Tensor, ...]]:
        return {name: prepare_images(pair, self.processor) for name, pair in self.suite.items()}

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        data = self.data
        for name, idx in round_robin({k: len(d[1]) for k, d in data.items()}, batch_size, generator):
            yield {"dataset": name, "pixel_values": data[name][0][idx], "labels": data[name][1][idx]}

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        device = model_device(model)
        logits = model(batch["dataset"], pixel_values=batch["pixel_values"].to(device))
        return F.cross_entropy(logits, batch["labels"].to(device))

    def evaluate(self, model: nn.Module, batch_size: int = 256) -> dict[str, float]:
        device, acc = model_device(model), {}
        with eval_mode(model):
            for name, (_, _, test_x, test_y) in self.data.items():
                correct = 0
                for i in range(0, len(test_y), batch_size):
                    logits = model(name, pixel_values=test_x[i : i + batch_size].to(device))
                    correct += logits.argmax(-1).cpu().eq(test_y[i : i + batch_size]).sum().item()
                acc[name] = correct / len(test_y)
        return acc
