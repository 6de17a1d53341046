"""task=clip: both CLIP towers tuned with CLIP-style contrast against class prompts, zero-shot-style eval.

Training: a batch holds images of one dataset plus class prompts; the loss is cross entropy of
image-to-prompt similarities times a temperature. The evaluation is the same classifier without
training, so `accuracy_before` is true zero-shot accuracy. Three switches (`task.objective`) say how:

* `prompts.train` / `prompts.eval`: a template (`"An image of {}"`), `dataset` (the dataset's first
  template) or `ensemble` (the dataset's template list, class embeddings averaged and renormalised);
* `logit_scale`: `exp` (CLIP's temperature, exp(logit_scale) = 100) or `raw` (the parameter itself,
  ln 100 = 4.6, as the official RandLoRA code multiplies);
* `loss`: `classes` (every class of the dataset competes) or `in_batch` (the official code: one prompt
  per image, B x B similarities, the target is the first image of the batch with the same class).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from tasks import forgetting, images, metrics, register
from tasks.base import Batch, ImageSuiteTask
from tasks.gather import gather_rows
from tasks.models import enable_memory_savers, eval_mode, load_kwargs, load_pretrained, model_device
from tasks.pixels import prepare_images, train_pixels
from tasks.prompts import templates_for
from tasks.sampling import TrainData, batches
from tasks.splits import SplitPair, load_test_split

log = logging.getLogger(__name__)

#: The untrained model's zero-shot accuracy per (setting, dataset), shared by the runs of one process (a
#: suite's datasets, an in-process sweep): before training every method's model computes the pretrained
#: model's function (each adapter starts at dW = 0 exactly, tests/methods/test_method_contract.py
#: test_identity_at_init_and_forward_equals_merged_weight; full and none change nothing before their first
#: step), so a dataset's "before" forgetting score is the same for every run that probes it: evaluated once.
UNTRAINED_ACCURACY: dict[tuple[str, str], float] = {}


@dataclass
class Prepared:
    """A dataset as tensors: normalised pixels, labels and tokenised class prompts (templates x classes)."""

    classes: list[str]
    train_x: torch.Tensor  # or tasks.pixels.LazyPixels (indexes the same way)
    train_y: torch.Tensor
    test_x: torch.Tensor  # the scored split: task.data.eval_split (test, or validation when tuning)
    test_y: torch.Tensor
    prompts: dict[str, torch.Tensor]       # training prompts, row t * C + c = template t, class c
    eval_prompts: dict[str, torch.Tensor]  # evaluation prompts, same layout


def class_embeddings(model: nn.Module, prompts: dict[str, torch.Tensor], num_classes: int,
                     classes: torch.Tensor | None = None) -> torch.Tensor:
    """(C, D) normalised text embeddings per class, averaged over templates (CLIP's prompt ensemble);
    `classes` restricts them to those classes (in that order)."""
    rows = prompts["input_ids"].shape[0]
    templates = rows // num_classes
    if classes is not None:
        pick = (torch.arange(templates)[:, None] * num_classes + classes.cpu()[None, :]).reshape(-1)
        prompts, num_classes = {k: v[pick] for k, v in prompts.items()}, len(classes)
    device = model_device(model)
    emb = text_features(model, prompts["input_ids"].to(device), prompts["attention_mask"].to(device))
    return F.normalize(emb.view(templates, num_classes, -1).mean(0), dim=-1)


def image_features(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """L2-normalised projected image embeddings (works for CLIPModel with adapters injected)."""
    return F.normalize(model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output), dim=-1)


def text_features(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    out = model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    return F.normalize(model.text_projection(out), dim=-1)


ATTENTION_MODES = ("trained", "counted_untrained")


@register("clip")
class ClipTask(ImageSuiteTask):
    """Tiny CLIP (`tiny-clip`) over the embedded image suite; a hub CLIP id plugs into the same code."""

    def build_model(self) -> nn.Module:
        from transformers import CLIPModel

        model = load_pretrained(CLIPModel.from_pretrained, self.cfg.model.path, **load_kwargs(self.cfg.model))
        log.info("clip task: %s, datasets %s", self.cfg.model.path, ", ".join(self.datasets))
        return enable_memory_savers(model, self.cfg.model)

    @property
    def untrained_targets(self) -> list[str] | None:
        """task.attention_adapters=counted_untrained: the attention adapters (task.attention_targets) are
        injected and counted but get no gradient, as in the official RandLoRA CLIP code
        (conf/task/clip.yaml)."""
        mode = self.cfg.attention_adapters
        if mode not in ATTENTION_MODES:
            raise ValueError(f"task.attention_adapters={mode!r} is not valid; "
                             f"use {' or '.join(ATTENTION_MODES)}")
        return list(self.cfg.attention_targets) if mode == "counted_untrained" else None

    @cached_property
    def tokenizer(self) -> object:
        from transformers import AutoTokenizer

        return load_pretrained(AutoTokenizer.from_pretrained, self.cfg.model.path)

    @cached_property
    def data(self) -> dict[str, Prepared]:
        out = {name: self.prepare(pair) for name, pair in self.suite.items()}
        log.info("clip prompts: train %r, eval %r (e.g. %r)", self.cfg.objective.prompts.train,
                 self.cfg.objective.prompts.eval, next(iter(out.values())).classes[:1])
        return out

    def prepare(self, pair: SplitPair) -> Prepared:
        """One dataset as tensors: pixels of train and the scored split, labels, tokenised prompts."""
        objective = self.cfg.objective
        train, test = (self._tokenize(templates_for(objective.prompts[k], pair.ensemble), pair.classes)
                       for k in ("train", "eval"))
        images = prepare_images(pair, self.processor, self.lazy, self.augment, int(self.cfg.seed),
                                self.eval_split)
        return Prepared(pair.classes, *images, prompts=train, eval_prompts=test)

    def _tokenize(self, templates: list[str], classes: list[str]) -> dict[str, torch.Tensor]:
        texts = [t.format(c) for t in templates for c in classes]
        tok = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        return {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}

    def train_data(self) -> TrainData:
        """Map-style training data (the runner feeds it to a DataLoader); lazy pixels decode in
        workers."""
        return TrainData({k: len(d.train_y) for k, d in self.data.items()}, self.train_batch,
                         in_memory=not self.lazy)

    def train_batch(self, name: str, rows: list[int], epoch: int) -> Batch:
        d = self.data[name]
        return {"dataset": name, "pixel_values": train_pixels(d.train_x, rows, epoch),
                "labels": d.train_y[rows], **d.prompts}

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        return batches(self.train_data(), batch_size, generator)

    def temperature(self, model: nn.Module) -> torch.Tensor:
        """The factor on cosine similarities: exp(logit_scale) (CLIP) or the raw parameter (official code)."""
        kind = self.cfg.objective.logit_scale
        if kind not in ("exp", "raw"):
            raise ValueError(f"task.objective.logit_scale={kind!r}; valid: exp, raw")
        return model.logit_scale.exp() if kind == "exp" else model.logit_scale

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        device, kind = model_device(model), self.cfg.objective.loss
        labels = batch["labels"].to(device)
        prompts = {k: batch[k] for k in ("input_ids", "attention_mask")}
        img = image_features(model, batch["pixel_values"].to(device))
        num_classes = len(self.data[batch["dataset"]].classes)
        if kind == "classes":
            txt = class_embeddings(model, prompts, num_classes)
            return F.cross_entropy(self.temperature(model) * img @ txt.T, labels)
        if kind != "in_batch":
            raise ValueError(f"task.objective.loss={kind!r}; valid: classes, in_batch")
        present, inverse = labels.unique(return_inverse=True)
        txt = class_embeddings(model, prompts, num_classes, present)[inverse]  # one prompt per image
        # data-parallel: this process's images against the prompts of the whole global batch (gather_rows)
        txt, every_label = gather_rows(txt), gather_rows(labels)
        first = (every_label[None, :] == labels[:, None]).int().argmax(1)  # first image of the same class
        return F.cross_entropy(self.temperature(model) * img @ txt.T, first)

    def evaluate_metrics(self, model: nn.Module, batch_size: int = 256, names: list[str] | None = None
                         ) -> dict[str, dict[str, float]]:
        """Zero-shot-style accuracy per dataset (of `names` only, if given), and the cross-entropy of the
        temperature-scaled similarities to the eval prompts' class embeddings."""
        device, out = model_device(model), {}
        with eval_mode(model):
            for name in self.datasets if names is None else names:
                d = self.data[name]
                txt = class_embeddings(model, d.eval_prompts, len(d.classes))
                chunks = (d.test_x[i : i + batch_size] for i in range(0, len(d.test_y), batch_size))
                logits = [(image_features(model, x.to(device)) @ txt.T).float().cpu() for x in chunks]
                out[name] = metrics.classification(torch.cat(logits), d.test_y,
                                                   float(self.temperature(model)))
        return out

    def evaluate(self, model: nn.Module, batch_size: int = 256,
                 names: list[str] | None = None) -> dict[str, float]:
        return {name: m["accuracy"] for name, m in self.evaluate_metrics(model, batch_size, names).items()}

    @cached_property
    def _forgetting_task(self) -> ClipProbe | None:
        """The same task over the suite's other datasets (their test splits alone); None without any."""
        sub = forgetting.other_datasets_config(self.cfg)
        return None if sub is None else ClipProbe(sub)

    def forgetting_probe(self, model: nn.Module, batch_size: int = 256, untrained: bool = False
                         ) -> dict[str, float | str] | None:
        """Zero-shot accuracy on each other dataset of the suite, by this task's own evaluation code; a
        dataset that could not be loaded gives the reason instead (tasks/forgetting.py records it as
        missing). Untrained, each dataset's accuracy is evaluated once per process and setting
        (`UNTRAINED_ACCURACY`)."""
        probe = self._forgetting_task
        if probe is None:
            return None
        loaded = list(probe.data)
        if not untrained:
            return {**probe.evaluate(model, batch_size, loaded), **probe.missing}
        key = probe.setting_key(model)
        todo = [d for d in loaded if (key, d) not in UNTRAINED_ACCURACY]
        if todo:
            UNTRAINED_ACCURACY.update({(key, d): acc
                                       for d, acc in probe.evaluate(model, batch_size, todo).items()})
        return {**{d: UNTRAINED_ACCURACY[(key, d)] for d in loaded}, **probe.missing}

    def setting_key(self, model: nn.Module) -> str:
        """Everything a dataset's zero-shot accuracy of the untrained model depends on: the task config but
        the dataset selection and the run seed (training augmentation only), the device, autocast, dtype."""
        cfg = OmegaConf.to_container(self.cfg, resolve=True)
        for key in ("dataset", "seed"):
            cfg.pop(key, None)
        cfg["data"].pop("datasets", None)
        device = model_device(model)
        return json.dumps([cfg, str(device), torch.is_autocast_enabled(device.type),
                           str(next(model.parameters()).dtype)], sort_keys=True, default=str)


class ClipProbe(ClipTask):
    """The forgetting probe's view of a suite's other datasets: each one's test split alone
    (`load_test_split`: no train shard, no validation hold-out), capped by task.data.test_size. A dataset
    that cannot be loaded or prepared is set aside in `missing` with a warning instead of failing the
    training run; the preflight (runners/preflight.py) is where a broken entry is a problem."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.missing: dict[str, str] = {}

    @cached_property
    def data(self) -> dict[str, Prepared]:
        templates = {k: spec.template for k, spec in images.SPECS.items()}
        out = {}
        for name in self.datasets:
            try:
                out[name] = self.prepare(load_test_split(name, self.cfg.data, images.make_split,
                                                         templates.get(name, "{}")))
            except Exception as err:  # any failure of one probe set: recorded, the run goes on
                self.missing[name] = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
                log.warning("forgetting probe: %s could not be loaded and is recorded as missing (%s); the "
                            "run goes on. `python -m runners.preflight` checks every dataset",
                            name, self.missing[name])
        return out
