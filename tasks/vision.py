"""task=vision: image classification with a pretrained ViT-style backbone and a linear head per dataset.

The tiny suite uses the vision tower of the embedded tiny CLIP (loaded with CLIPVisionModel from the
same folder); another model folder or hub id (e.g. DINOv2, google/vit) loads with AutoModel.
`accuracy_before` is the untrained head; method=none trains only the head (a linear probe).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import cached_property
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from tasks import metrics, register
from tasks.base import Batch, ImageSuiteTask
from tasks.models import (
    HeadedModel,
    enable_memory_savers,
    eval_mode,
    load_kwargs,
    load_pretrained,
    model_device,
)
from tasks.pixels import prepare_images, train_pixels
from tasks.sampling import TrainData, batches

log = logging.getLogger(__name__)


def load_vision_backbone(path: str, **kwargs: object) -> nn.Module:
    """The image encoder of `path`: CLIP checkpoints give their vision tower, others (DINOv2, ViT)
    AutoModel. `kwargs` go to from_pretrained (e.g. the base weights' dtype)."""
    from transformers import AutoConfig, AutoModel, CLIPVisionModel

    config = load_pretrained(AutoConfig.from_pretrained, path)
    loader = CLIPVisionModel.from_pretrained if config.model_type == "clip" else AutoModel.from_pretrained
    return load_pretrained(loader, path, **kwargs)


class ClipImageEncoder(nn.Module):
    """CLIP's image tower + projection, shaped like a Hugging Face model for `HeadedModel`: its
    `pooler_output` is the L2-normalised image embedding the zero-shot classifier scores."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.vision_model, self.visual_projection = clip.vision_model, clip.visual_projection
        self.config = clip.config

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        emb = self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)
        return SimpleNamespace(pooler_output=F.normalize(emb, dim=-1))


class PromptHead(nn.Module):
    """A frozen zero-shot classifier: logit scale x normalised class-prompt embeddings. Buffers, not
    parameters, so no method (not even full fine-tuning) trains it, as in the RandLoRA vision setting."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def hidden_size(backbone: nn.Module) -> int:
    cfg = backbone.config
    return int(getattr(cfg, "hidden_size", None) or cfg.vision_config.hidden_size)


@register("vision")
class VisionTask(ImageSuiteTask):
    """Backbone + `heads.<dataset>` linear heads over the image suite; top-1 per dataset."""

    def build_model(self) -> nn.Module:
        if self.cfg.model.head == "prompts":
            return self._clip_with_prompt_heads()
        m = self.cfg.model
        backbone = load_vision_backbone(m.path, **load_kwargs(m))
        backbone = enable_memory_savers(backbone, m)
        classes = {name: len(pair.classes) for name, pair in self.suite.items()}
        log.info("vision task: %s, datasets %s", m.path, ", ".join(classes))
        return HeadedModel(backbone, hidden_size(backbone), classes,
                           pool=self.cfg.model.pool, seed=int(self.cfg.data.seed),
                           bias=bool(self.cfg.model.head_bias),
                           init_std=float(self.cfg.model.head_init_std))

    def _clip_with_prompt_heads(self) -> nn.Module:
        """`task.model.head: prompts`: a CLIP image encoder under a frozen text-prompt classifier per
        dataset (the text tower is used once, to build the classifier, then dropped)."""
        from transformers import AutoTokenizer, CLIPModel

        from tasks.clip import class_embeddings

        clip = load_pretrained(CLIPModel.from_pretrained, self.cfg.model.path, **load_kwargs(self.cfg.model))
        tokenizer = load_pretrained(AutoTokenizer.from_pretrained, self.cfg.model.path)
        model = HeadedModel(ClipImageEncoder(clip), clip.config.projection_dim,
                            {name: len(pair.classes) for name, pair in self.suite.items()}, pool="pooler")
        with torch.no_grad():
            for name, pair in self.suite.items():  # the template ensemble of the official head (src/heads.py)
                texts = [t.format(c) for t in pair.ensemble for c in pair.classes]
                tok = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
                txt = class_embeddings(clip, dict(tok), len(pair.classes))
                model.heads[name] = PromptHead((clip.logit_scale.exp() * txt).float())
        log.info("vision task: %s image encoder, frozen prompt classifiers for %s", self.cfg.model.path,
                 ", ".join(self.suite))
        enable_memory_savers(clip, self.cfg.model)
        return model

    @cached_property
    def data(self) -> dict[str, tuple[torch.Tensor, ...]]:
        seed = int(self.cfg.seed)
        return {name: prepare_images(pair, self.processor, self.lazy, self.augment, seed, self.eval_split)
                for name, pair in self.suite.items()}

    def train_data(self) -> TrainData:
        """Map-style training data (the runner feeds it to a DataLoader); lazy pixels decode in
        workers."""
        return TrainData({k: len(d[1]) for k, d in self.data.items()}, self.train_batch,
                         in_memory=not self.lazy)

    def train_batch(self, name: str, rows: list[int], epoch: int) -> Batch:
        x, y = self.data[name][:2]
        return {"dataset": name, "pixel_values": train_pixels(x, rows, epoch), "labels": y[rows]}

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        return batches(self.train_data(), batch_size, generator)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        device = model_device(model)
        logits = model(batch["dataset"], pixel_values=batch["pixel_values"].to(device))
        return F.cross_entropy(logits, batch["labels"].to(device))

    def evaluate_metrics(self, model: nn.Module, batch_size: int = 256) -> dict[str, dict[str, float]]:
        device, out = model_device(model), {}
        with eval_mode(model):
            for name, (_, _, test_x, test_y) in self.data.items():  # test_*: the eval_split's tensors
                logits = [model(name, pixel_values=test_x[i : i + batch_size].to(device)).float().cpu()
                          for i in range(0, len(test_y), batch_size)]
                out[name] = metrics.classification(torch.cat(logits), test_y)
        return out
