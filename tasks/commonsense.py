"""task=commonsense: decoder LMs fine-tuned on commonsense instructions, scored by answer accuracy.

The LLM-Adapters protocol the RandLoRA paper follows (Hu et al. 2023, arXiv 2304.01933): train on the
commonsense-170k (or -15k) instruction set with the causal-LM loss on the response only, then evaluate on
eight benchmarks (BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA). Evaluation here scores
each candidate answer keyword ("the correct answer is option1") by its log-likelihood after the prompt and
takes the best: the same answer accuracy as LLM-Adapters' generate-then-parse, without generation noise.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn

from tasks import register
from tasks.base import Batch, Task
from tasks.common import enable_memory_savers, eval_mode, load_kwargs, load_pretrained, model_device, selected
from tasks.data import cap, open_source
from tasks.regimes import steps_for_epochs

log = logging.getLogger(__name__)
IGNORE = -100  # label of tokens the loss skips (prompt, padding)
TRAIN = "commonsense_train"


@dataclass
class Example:
    """One tokenised training example: prompt + response ids, and where the response starts."""

    ids: list[int]
    start: int


def pad_batch(seqs: list[list[int]], starts: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask, and labels that are IGNORE before `start` and on padding."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, (seq, start) in enumerate(zip(seqs, starts)):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        labels[row, start : len(seq)] = torch.tensor(seq[start:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def response_logprob(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probability of the labelled (response) tokens of each row."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * (target != IGNORE)).sum(-1)


@register("commonsense")
class CommonsenseTask(Task):
    """Causal LM + instruction data; `accuracy` per benchmark is answer accuracy (no task head)."""

    trains_per_dataset = False  # one adapter trained on the mixed commonsense set, scored on 8 benchmarks

    @property
    def datasets(self) -> list[str]:
        return selected(list(self.cfg.data.datasets), self.cfg.get("dataset"))

    def build_model(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        model = load_pretrained(AutoModelForCausalLM.from_pretrained, self.cfg.model.path, **load_kwargs(self.cfg.model))
        model.config.use_cache = False  # training and one-pass scoring: no KV cache needed
        log.info("commonsense task: %s, benchmarks %s", self.cfg.model.path, ", ".join(self.datasets))
        return enable_memory_savers(model, self.cfg.model)

    @cached_property
    def tokenizer(self) -> object:
        from transformers import AutoTokenizer

        tok = load_pretrained(AutoTokenizer.from_pretrained, self.cfg.model.path)
        if tok.pad_token_id is None:  # LLaMA-3 / Qwen2 base ship no pad token; padding is masked anyway
            tok.pad_token = tok.eos_token
        return tok

    # --- text ------------------------------------------------------------------------------------------

    def prompt(self, row: dict) -> str:
        d = self.cfg.data
        return str(d.prompt).format(instruction=row[d.get("instruction_column", "instruction")],
                                    input=row.get(d.get("input_column", "input")) or "")

    def response(self, answer: str) -> str:
        return str(self.cfg.data.response).format(answer)

    def encode(self, prompt: str, response: str, eos: bool) -> Example:
        """Token ids of prompt + response (truncated to max_length), response start = prompt length."""
        tok, limit = self.tokenizer, int(self.cfg.data.get("max_length", 256))
        start = len(tok(prompt)["input_ids"])
        ids = tok(prompt + response)["input_ids"]
        if eos and tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
            ids = ids + [tok.eos_token_id]
        return Example(ids[:limit], min(start, limit))

    # --- data ------------------------------------------------------------------------------------------

    @cached_property
    def train_set(self) -> Dataset:
        src = self.cfg.data.train
        ds = open_source("train", src, key="task.data.train")[src.get("split", "train")]
        return cap(ds, self.cfg.data.get("train_size"))

    @cached_property
    def test_sets(self) -> dict[str, Dataset]:
        out = {}
        for name in self.datasets:
            src = self.cfg.data.sources[name]
            out[name] = cap(open_source(name, src)[src.get("test_split", "test")], self.cfg.data.get("test_size"))
        return out

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        ds, answer = self.train_set, self.cfg.data.get("answer_column", "answer")
        n = len(ds)
        while True:
            perm = torch.randperm(n, generator=generator).tolist()
            for i in range(0, n - min(batch_size, n) + 1, min(batch_size, n)):
                rows = ds.select(perm[i : i + batch_size])
                ex = [self.encode(self.prompt(r), self.response(r[answer]), eos=True) for r in rows]
                yield {"dataset": TRAIN, **pad_batch([e.ids for e in ex], [e.start for e in ex],
                                                     self.tokenizer.pad_token_id)}

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        device = model_device(model)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        labels = batch["labels"].to(device)
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)

    def planned_steps(self, batch_size: int, grad_accum: int = 1) -> int | None:
        epochs = self.cfg.data.get("epochs")
        if epochs is None:
            return None
        return steps_for_epochs({TRAIN: len(self.train_set)}, {TRAIN: epochs}, batch_size * grad_accum)

    # --- evaluation ------------------------------------------------------------------------------------

    def evaluate(self, model: nn.Module, batch_size: int = 256) -> dict[str, float]:
        """Answer accuracy per benchmark: the candidate answer with the highest log-likelihood."""
        acc = {}
        with eval_mode(model):
            for name, ds in self.test_sets.items():
                acc[name] = self._accuracy(model, name, ds, batch_size)
        return acc

    def _accuracy(self, model: nn.Module, name: str, ds: Dataset, batch_size: int) -> float:
        choices = [str(c) for c in self.cfg.data.sources[name].choices]
        answer = self.cfg.data.get("answer_column", "answer")
        device, pad = model_device(model), self.tokenizer.pad_token_id
        # full-vocabulary logits of (examples x choices) sequences: a separate, small scoring batch
        batch_size = min(batch_size, int(self.cfg.data.get("score_batch_size") or batch_size))
        pairs = [self.encode(self.prompt(r), self.response(c), eos=False) for r in ds for c in choices]
        scores = []
        for i in range(0, len(pairs), max(1, batch_size)):
            chunk = pairs[i : i + batch_size]
            batch = {k: v.to(device) for k, v in pad_batch([p.ids for p in chunk], [p.start for p in chunk], pad).items()}
            scores.append(response_logprob(model, batch).cpu())
        best = torch.cat(scores).view(len(ds), len(choices)).argmax(-1).tolist()
        gold = [str(a).strip().lower() for a in ds[answer]]
        correct = sum(choices[b].lower() == g for b, g in zip(best, gold))
        return correct / max(1, len(ds))
