"""The task contract (what the runner needs from a task, and nothing more) and the tasks' shared bases.

A task owns its backbone, its data and its metric. The runner owns the adaptation method, the
optimizer and the measurements, so every method is measured the same way on every task.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from functools import cached_property
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from tasks import images
from tasks.augment import Augment, from_config
from tasks.models import load_pretrained, memory_savers
from tasks.regimes import regime_name, steps_for_epochs
from tasks.sampling import TrainData
from tasks.sources import source_config
from tasks.splits import EVAL_SPLITS, SplitPair, load_suite

Batch = dict[str, Any]


class Task(ABC):
    """One modality's model + data + loss + evaluation, configured by the `task` config node.

    Contract used by `runners.train.run`:
      * `build_model()` loads the pretrained backbone (with `from_pretrained`) plus any task head; all
        parameters may still require grad, the runner decides what is trained.
      * `target_modules` names the Linear layers adapters wrap (suffixes or a regex), from config.
      * `head_prefixes` are parameter-name prefixes trained for every method (the task head); an empty
        list for CLIP, whose "head" is the text tower's class prompts.
      * `train_data()` is the training data, map-style (`tasks.sampling.TrainData`): the runner's DataLoader
        samples it, so workers decode and a resumed run jumps to its next batch;
        `train_batches(batch_size, generator)` is the same stream without a DataLoader (tests, tools).
      * `loss(model, batch)` returns a scalar loss; `evaluate(model)` returns top-1 accuracy per dataset
        on the split `eval_split` names (test, or the validation split hyper-parameters are chosen on).
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    @property
    def target_modules(self) -> list[str] | str:
        """Name suffixes (a list), or one regex (a string, kept whole): GLUE's size=base uses a regex so
        adapters wrap only encoder layers, never the RoBERTa head's own `dense`."""
        targets = self.cfg.model.target_modules
        return targets if isinstance(targets, str) else list(targets)

    @property
    def untrained_targets(self) -> list[str] | None:
        """Adapted layers whose adapters are injected and counted but never trained (methods.leave_untrained);
        None: every adapter trains. Only a task reproducing an upstream defect names any (task=clip)."""
        return None

    @property
    def head_prefixes(self) -> list[str]:
        """Module-name prefixes of the head (`heads`); a trailing "." in config (`heads.`) is tolerated,
        since the runner matches `name == p or name.startswith(p + ".")`."""
        return [str(p).rstrip(".") for p in self.cfg.head_prefixes]

    @property
    def datasets(self) -> list[str]:
        """Names of the evaluation datasets of this run: the suite's `task.data.datasets`, or the one
        `task.dataset` names."""
        return selected(list(self.cfg.data.datasets), self.cfg.dataset)

    @property
    def train_source(self) -> tuple[DictConfig, str] | None:
        """A training file shared by every evaluation dataset, with its config key (commonsense's instruction
        set); None where each dataset trains on a split of its own."""
        return None

    @abstractmethod
    def build_model(self) -> nn.Module: ...

    @abstractmethod
    def train_data(self) -> TrainData: ...

    @abstractmethod
    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]: ...

    @property
    def dataset_revisions(self) -> dict[str, str | None]:
        """Each dataset's hub revision, recorded in results.json; None for local or generated data."""
        return dict.fromkeys(self.datasets)

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor: ...

    @abstractmethod
    def evaluate_metrics(self, model: nn.Module, batch_size: int = 256) -> dict[str, dict[str, float]]:
        """Every metric per dataset on `eval_split` (model in eval mode, no grad): `accuracy` and the mean
        `loss` of a classification set, plus a source's own (GLUE: e.g. Matthews correlation for CoLA)."""

    def evaluate(self, model: nn.Module, batch_size: int = 256) -> dict[str, float]:
        """The primary metric per dataset (top-1 accuracy, except e.g. STS-B's Pearson r)."""
        return {name: m[self.primary_metric(name)]
                for name, m in self.evaluate_metrics(model, batch_size).items()}

    @property
    def eval_split(self) -> str:
        """The split `evaluate` / `evaluate_metrics` score (`task.data.eval_split`): `test`, the only one
        ever reported, or `validation`, on which sweeps choose hyper-parameters (recorded as
        metrics.eval_split)."""
        split = str(self.cfg.data.eval_split)
        if split not in EVAL_SPLITS:
            raise ValueError(f"task.data.eval_split={split!r} is not a split; "
                             f"valid: {', '.join(EVAL_SPLITS)}")
        return split

    def primary_metric(self, dataset: str) -> str:
        """The metric `accuracy` / per_dataset report for `dataset` (a regression task has no accuracy)."""
        return "accuracy"

    #: How `forgetting_probe`'s numbers read: "accuracy" (higher = knowledge kept; forgetting = before -
    #: after) or "loss" (lower = kept; forgetting = after - before). See tasks/forgetting.py.
    forgetting_metric: str = "accuracy"

    def forgetting_probe(self, model: nn.Module, batch_size: int = 256, untrained: bool = False
                         ) -> dict[str, float] | None:
        """The probe of what training costs elsewhere, per probe set, on data the run never trains on; the
        runner calls it before (`untrained`: the model as adapt() left it, which computes the pretrained
        model's function, every adapter starting at dW = 0) and after training (model in eval mode, no
        grad) and records `metrics.forgetting`. Default None: no probe defined for this task (e.g. vision's
        linear heads)."""
        return None

    #: Train one fresh adapter per dataset of a suite (the image suites and GLUE, as in the papers).
    #: False where one training set serves every evaluation set (commonsense: one adapter, 8 benchmarks).
    trains_per_dataset: bool = True

    @property
    def regime(self) -> str:
        """The training-data regime: `full`, `<k>shot` or `frac<f>`."""
        return "full"

    def planned_steps(self, batch_size: int, grad_accum: int = 1) -> int | None:
        """Optimizer steps the configured epochs amount to; None when the config gives no epochs
        (then `trainer.max_steps` decides)."""
        return None

    @property
    def memory_savers(self) -> dict[str, Any]:
        """Memory-saving switches in effect (gradient checkpointing, base weight dtype), for results."""
        return memory_savers(self.cfg.model)


def selected(all_names: list[str], wanted: str | None) -> list[str]:
    """The datasets of this run: all of the suite, or the one `dataset=` names (checked)."""
    if wanted is None:
        return list(all_names)
    if wanted not in all_names:
        raise ValueError(f"unknown dataset {wanted!r} for this task; valid: {', '.join(all_names)}")
    return [wanted]


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
        epochs = {}
        for name in self.datasets:  # type: ignore[attr-defined]
            src = source_config(data, name)
            value = data.shot_epochs if data.shots else (data.epochs or (src.epochs if src else None))
            if value is None:
                return None  # no epochs configured: trainer.max_steps decides
            epochs[name] = value
        min_steps = int(data.min_steps_per_epoch) if data.shots else 0
        return steps_for_epochs(self.train_sizes(), epochs, batch_size * grad_accum, min_steps)

    @property
    def regime(self) -> str:
        return regime_name(self.cfg.data.shots, self.cfg.data.fraction)


class ImageSuiteTask(EpochPlanMixin, Task):
    """Shared by clip and vision: the image suite of `task.data`, restricted by `task.dataset`."""

    @cached_property
    def processor(self) -> object:
        from transformers import AutoImageProcessor

        processor = self.cfg.model.processor  # e.g. DINOv2 with CLIP's statistics (vision/base.yaml)
        overrides = OmegaConf.to_container(processor) if processor is not None else {}
        return load_pretrained(AutoImageProcessor.from_pretrained, self.cfg.model.path, **overrides)

    @cached_property
    def augment(self) -> Augment | None:
        """Training augmentation (`task.data.augment`); None for the tiny suite."""
        return from_config(self.cfg.data.augment, self.processor)

    @property
    def lazy(self) -> bool:
        """Process pixels per batch (hub datasets) instead of once up front (the tiny suite)."""
        return self.cfg.data.preprocess == "lazy"

    @cached_property
    def suite(self) -> dict[str, SplitPair]:
        templates = {k: s.template for k, s in images.SPECS.items()}
        return load_suite(self.cfg.data, self.datasets, images.make_split, templates)
