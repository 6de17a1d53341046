"""task=commonsense: a decoder LM fine-tuned once on commonsense instructions, scored on eight benchmarks.

The protocol of the official RandLoRA code (github.com/PaulAlbert31/RandLoRA commonsense_reasoning/, commit
4ac565e, itself derived from LLM-Adapters, Hu et al. 2023, arXiv 2304.01933): one adapter trained for one
epoch on commonsense_170k (or _15k) with the causal-LM loss on prompt + response + EOS (finetune.py:105,
train_on_inputs=True), minus a 120-example validation hold-out of that file (finetune.py:351-353); then
BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e, ARC-c and OBQA are scored with the evaluation prompt,
which is never truncated (commonsense_evaluate.py:89; only training cuts at cutoff_len 256).

Per benchmark, from the log-likelihood of continuations after "<evaluation prompt>the correct answer is":
  * `accuracy` (the headline): the answer keyword ("solution1", "true", ...) the model finds likeliest.
    The official code generates with 4-beam search and takes the first keyword its regex finds
    (commonsense_evaluate.py:78-111, 315-346); both choose among the same keywords, this one without
    generation cost (listed in task.protocol.deviations).
  * `acc`, `acc_norm`, `acc_bytes`: lm-evaluation-harness multiple-choice scoring of each option's text
    (parsed from the instruction: "Solution1: ..."), argmax of the summed log-likelihood, of it divided by
    the option's length in characters, and in UTF-8 bytes (lm_eval/api/task.py:1494-1512, v0.4.13).
  * `val_loss`: the training loss on the validation hold-out (the same number in every benchmark's entry:
    one adapter serves all eight).
With task.data.eval_split=validation the eight benchmarks are not scored: the hold-out is, as one entry
(`commonsense_validation`) with its answer-keyword `accuracy` (the primary metric, on which `+sweep=tuned`
chooses the lr) and its `loss` (which breaks ties between lrs).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from omegaconf import DictConfig
from torch import nn

from tasks import forgetting, register
from tasks.base import Batch, Task
from tasks.gather import per_process_share
from tasks.models import enable_memory_savers, eval_mode, load_kwargs, load_pretrained, model_device
from tasks.regimes import steps_for_epochs
from tasks.sampling import TrainData, batches
from tasks.sources import open_source, source_config, with_source_defaults
from tasks.splits import cap

log = logging.getLogger(__name__)
IGNORE = -100  # label of tokens the loss skips (padding; the prompt when train_on_inputs is false)
TRAIN = "commonsense_train"
VALIDATION = "commonsense_validation"  # the per_dataset key of the hold-out when eval_split=validation

Row = tuple[list[int], list[int]]  # (input ids, labels) of one sequence
Pair = tuple[list[int], list[int]]  # (context ids, continuation ids) of one scoring request


# --- pure helpers --------------------------------------------------------------------------------------

def pad_batch(rows: list[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels; padding is masked and IGNOREd."""
    width = max(len(ids) for ids, _ in rows)
    ids_t = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels_t = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, labels) in enumerate(rows):
        ids_t[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels_t[r, : len(labels)] = torch.tensor(labels, dtype=torch.long)
        mask[r, : len(ids)] = 1
    return {"input_ids": ids_t, "attention_mask": mask, "labels": labels_t}


def _labelled_logits(model: nn.Module, batch: dict[str, torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits at labelled positions as float32, their targets, their row index). Only those positions are
    upcast: full-vocabulary float32 logits of a whole batch are large (151936 words for Qwen2)."""
    device = model_device(model)
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
    logits = model(**inputs).logits
    labels = batch["labels"].to(device)[:, 1:]
    keep = labels != IGNORE
    return logits[:, :-1][keep].float(), labels[keep], keep.nonzero()[:, 0]


def token_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over the labelled positions, and their number."""
    logits, targets, _ = _labelled_logits(model, batch)
    return F.cross_entropy(logits, targets, reduction="sum"), torch.tensor(len(targets), device=logits.device)


def encode_pair(tok: object, context: str, continuation: str) -> Pair:
    """(context ids, continuation ids) as lm-evaluation-harness splits them (lm_eval/api/model.py
    `_encode_pair`, v0.4.13): trailing spaces of the context move to the continuation, the whole text is
    tokenised once and cut after the context's own tokens. Nothing is truncated."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole, ctx = tok(context + continuation)["input_ids"], tok(context)["input_ids"]
    return ctx, whole[len(ctx):]


def continuation_logprobs(model: nn.Module, pairs: list[Pair], pad_id: int, batch_size: int) -> list[float]:
    """Summed log-probability of each continuation given its context, (context ids, continuation ids)
    pairs scored longest first so that a batch pads little."""
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    out = [0.0] * len(pairs)
    for start in range(0, len(order), max(1, batch_size)):
        idx = order[start : start + max(1, batch_size)]
        rows = [(ctx + cont, [IGNORE] * len(ctx) + cont) for ctx, cont in (pairs[i] for i in idx)]
        logits, targets, row = _labelled_logits(model, pad_batch(rows, pad_id))
        logp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        sums = torch.zeros(len(idx), device=logp.device).index_add_(0, row, logp)
        for i, s in zip(idx, sums.tolist(), strict=True):
            out[i] = s
    return out


def choice_metrics(lls: list[float], choices: list[str], gold: int) -> dict[str, float]:
    """lm-evaluation-harness multiple-choice metrics of one example (lm_eval/api/task.py:1494-1512, v0.4.13):
    `acc` argmax of the summed log-likelihoods; `acc_norm` of them divided by each choice's length in
    characters (`len(choice)`); `acc_bytes` divided by its UTF-8 byte length. gold = -1: always wrong."""
    ll = np.asarray(lls, dtype=float)
    chars = np.array([max(1.0, len(c)) for c in choices])  # max(1, .): an empty option must not divide by 0
    nbytes = np.array([max(1.0, len(c.encode("utf-8"))) for c in choices])
    return {"acc": float(np.argmax(ll) == gold), "acc_norm": float(np.argmax(ll / chars) == gold),
            "acc_bytes": float(np.argmax(ll / nbytes) == gold)}


def option_texts(instruction: str, label: str) -> dict[int, str]:
    """The options an LLM-Adapters instruction lists, by number: "Solution1: a Solution2: b Answer format:
    solution1/solution2" -> {1: "a", 2: "b"} (options end at the next option or at "Answer format:")."""
    lab = re.escape(label)
    pattern = rf"{lab}(\d+):\s*(.*?)\s*(?={lab}\d+:|Answer format:|\Z)"
    return {int(k): v for k, v in re.findall(pattern, instruction, flags=re.DOTALL)}


def answer_keywords(instruction: str) -> list[str]:
    """The answer keywords an LLM-Adapters instruction offers, from its closing "Answer format: k1/k2/..."
    (every commonsense_170k row ends so; the benchmarks' own regexes accept exactly these words)."""
    found = re.search(r"Answer format:\s*(\S+)", instruction)
    if not found:
        raise ValueError("validation example without 'Answer format: k1/k2' in its instruction: "
                         f"{instruction[:200]!r}")
    return found.group(1).split("/")


def hold_out(ds: Dataset, size: int, seed: int) -> tuple[Dataset, Dataset | None]:
    """(train, validation): the official `train_test_split(test_size=120, shuffle=True, seed=42)`
    (finetune.py:351-353), the same `datasets` call, so the same examples are held out. A set too small to
    spare `size` examples holds out half of itself (a smoke test still trains); size 0: no hold-out."""
    if size > len(ds) // 2:
        log.warning("training set has %d examples: holding out %d for validation instead of %d",
                    len(ds), len(ds) // 2, size)
        size = len(ds) // 2
    if size <= 0:
        return ds, None
    parts = ds.train_test_split(test_size=size, shuffle=True, seed=seed)
    return parts["train"], parts["test"]


# --- the task ------------------------------------------------------------------------------------------

@register("commonsense")
class CommonsenseTask(Task):
    """Causal LM + instruction data; no task head (the LM head answers)."""

    trains_per_dataset = False  # one adapter trained on the mixed commonsense set, scored on 8 benchmarks

    def build_model(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        model = load_pretrained(AutoModelForCausalLM.from_pretrained, self.cfg.model.path,
                                **load_kwargs(self.cfg.model))
        model.config.use_cache = False  # training and one-pass scoring: no KV cache needed
        log.info("commonsense task: %s, benchmarks %s", self.cfg.model.path, ", ".join(self.datasets))
        return enable_memory_savers(model, self.cfg.model)

    @cached_property
    def tokenizer(self) -> object:
        from transformers import AutoTokenizer

        tok = load_pretrained(AutoTokenizer.from_pretrained, self.cfg.model.path)
        if tok.pad_token_id is None:  # LLaMA-3 ships no pad token; padding is masked out anyway
            tok.pad_token = tok.eos_token
        return tok

    # --- text ------------------------------------------------------------------------------------------

    def train_text(self, row: dict, output: str | None = None) -> str:
        """finetune.py generate_prompt: the training template (with or without input) filled with the row
        and its `output` ("the correct answer is X"); `output=""` gives the user prompt."""
        d = self.cfg.data
        given = row.get(d.input_column) or ""
        template = d.train_prompt_input if given else d.train_prompt
        return str(template).format(instruction=row[d.instruction_column], input=given,
                                    output=row[d.output_column] if output is None else output)

    def eval_context(self, row: dict) -> str:
        """commonsense_evaluate.py generate_prompt (the instruction only), then the response's lead-in."""
        d = self.cfg.data
        return str(d.eval_prompt).format(instruction=row[d.instruction_column]) + str(d.response_prefix)

    def encode_train(self, row: dict) -> Row:
        """finetune.py tokenize + generate_and_tokenize_prompt: cut to cutoff_len, append EOS if there is
        room, labels = ids; with train_on_inputs false the user prompt's tokens are IGNOREd."""
        tok, limit = self.tokenizer, int(self.cfg.data.max_length)
        ids = tok(self.train_text(row), truncation=True, max_length=limit)["input_ids"]
        if tok.eos_token_id is not None and ids and ids[-1] != tok.eos_token_id and len(ids) < limit:
            ids = [*ids, tok.eos_token_id]
        labels = list(ids)
        if not self.cfg.data.train_on_inputs:
            user = len(tok(self.train_text(row, output=""), truncation=True, max_length=limit)["input_ids"])
            labels = [IGNORE] * user + labels[user:]
        return ids, labels

    def options(self, name: str, row: dict, keywords: list[str]) -> tuple[list[str], int]:
        """One example's option texts and the gold one's index: parsed from the instruction by the
        benchmark's `choice_label` (keyword i names option i+1), or the keywords themselves (BoolQ)."""
        d, src = self.cfg.data, source_config(self.cfg.data, name)
        answer = str(row[d.answer_column])
        gold = keywords.index(answer) if answer in keywords else -1
        if not src.choice_label:
            return keywords, gold
        found = option_texts(row[d.instruction_column], str(src.choice_label))
        if not found or (gold >= 0 and gold + 1 not in found):
            raise ValueError(
                f"{name}: no options labelled '{src.choice_label}<k>:' (or none for the gold answer "
                f"{answer!r}) in the instruction {row[d.instruction_column][:200]!r}. Fix task.data.sources."
                f"{name}.choice_label, or set task.data.score_options=false to skip acc/acc_norm.")
        numbers = sorted(found)
        return [found[k] for k in numbers], numbers.index(gold + 1) if gold >= 0 else -1

    # --- data ------------------------------------------------------------------------------------------

    @property
    def train_source(self) -> tuple[DictConfig, str]:
        d = self.cfg.data
        return with_source_defaults(d.source_defaults, d.train, "task.data.train"), "task.data.train"

    @cached_property
    def _train_and_val(self) -> tuple[Dataset, Dataset | None]:
        d = self.cfg.data
        src, key = self.train_source
        ds = open_source("train", src, key=key, splits=[src.split])[src.split]
        train, val = hold_out(ds, int(d.val_set_size or 0), int(d.val_seed))
        return cap(train, d.train_size), val

    @property
    def train_set(self) -> Dataset:
        """The training file minus the validation hold-out (capped by task.data.train_size)."""
        return self._train_and_val[0]

    @property
    def val_set(self) -> Dataset | None:
        return self._train_and_val[1]

    @cached_property
    def test_sets(self) -> dict[str, Dataset]:
        out = {}
        for name in self.datasets:
            src = source_config(self.cfg.data, name)
            ds = open_source(name, src, splits=[src.test_split])[src.test_split]
            if src.size and len(ds) != int(src.size):
                log.warning("%s: %d test examples where the official test set has %d "
                            "(task.data.sources.%s.size)", name, len(ds), int(src.size), name)
            out[name] = cap(ds, self.cfg.data.test_size)
        return out

    def train_data(self) -> TrainData:
        """Map-style training data, tokenised per batch (in worker processes); the last, smaller batch of
        an epoch is kept (as the official DataLoader does)."""
        if len(self.train_set) == 0:
            raise ValueError("the commonsense training set is empty (after the validation hold-out)")
        return TrainData({TRAIN: len(self.train_set)}, self.train_batch, in_memory=False, keep_last=True)

    def train_batch(self, name: str, rows: list[int], epoch: int) -> Batch:
        encoded = [self.encode_train(r) for r in self.train_set.select(rows)]
        return {"dataset": TRAIN, **pad_batch(encoded, self.tokenizer.pad_token_id)}

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        return batches(self.train_data(), batch_size, generator)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        total, count = token_nll(model, batch)
        return total / per_process_share(count)  # per token of the whole (data-parallel) batch

    def planned_steps(self, batch_size: int, grad_accum: int = 1) -> int | None:
        epochs = self.cfg.data.epochs
        if epochs is None:
            return None
        return steps_for_epochs({TRAIN: len(self.train_set)}, {TRAIN: epochs}, batch_size * grad_accum)

    # --- evaluation ------------------------------------------------------------------------------------

    def eval_examples(self) -> dict[str, int]:
        if self.eval_split == "validation":
            return {VALIDATION: len(self.val_set) if self.val_set is not None else 0}
        return {name: len(ds) for name, ds in self.test_sets.items()}

    def evaluate_metrics(self, model: nn.Module, batch_size: int = 256) -> dict[str, dict[str, float]]:
        """accuracy (answer-keyword, the headline), acc, acc_norm, acc_bytes per benchmark, and the
        validation hold-out's loss (`val_loss`) in each entry; with task.data.eval_split=validation, the
        hold-out's answer accuracy and `loss` instead (see `validation_metrics`)."""
        batch_size = min(batch_size, int(self.cfg.data.score_batch_size or batch_size))
        if self.eval_split == "validation":
            return {VALIDATION: self.validation_metrics(model, batch_size)}
        with eval_mode(model):
            val = self.validation_loss(model, batch_size)
            out = {name: self._benchmark(model, name, ds, batch_size) for name, ds in self.test_sets.items()}
        if val is not None:
            log.info("validation loss (%d held-out examples): %.4f", len(self.val_set), val)
            for metrics in out.values():
                metrics["val_loss"] = val
        return out

    def validation_loss(self, model: nn.Module, batch_size: int) -> float | None:
        """Token-mean training loss (same encoding and mask) on the hold-out; None without one."""
        if not self.cfg.data.val_set_size or self.val_set is None:
            return None
        ds = self.val_set
        total, count = 0.0, 0
        with eval_mode(model):
            for i in range(0, len(ds), batch_size):
                rows = [self.encode_train(r) for r in ds.select(range(i, min(i + batch_size, len(ds))))]
                nll, n = token_nll(model, pad_batch(rows, self.tokenizer.pad_token_id))
                total, count = total + float(nll), count + int(n)
        return total / max(1, count)

    def validation_metrics(self, model: nn.Module, batch_size: int) -> dict[str, float]:
        """The validation hold-out (120 examples of the training file) scored as the benchmarks are:
        `accuracy` = the answer keyword the model finds likeliest among those its instruction lists ("Answer
        format: true/false"), the primary metric hyper-parameters are chosen on (higher is better); `loss`
        beside it."""
        if self.val_set is None:
            raise ValueError("task.data.eval_split=validation needs the validation hold-out; set "
                             "task.data.val_set_size > 0")
        d, tok = self.cfg.data, self.tokenizer
        rows = list(self.val_set)
        keywords = [answer_keywords(row[d.instruction_column]) for row in rows]
        pairs = [encode_pair(tok, self.eval_context(row), k)
                 for row, ks in zip(rows, keywords, strict=True) for k in ks]
        with eval_mode(model):
            lls = iter(continuation_logprobs(model, pairs, tok.pad_token_id, batch_size))
            loss = self.validation_loss(model, batch_size)
        correct = 0
        for row, ks in zip(rows, keywords, strict=True):
            scores = [next(lls) for _ in ks]
            correct += int(ks[int(np.argmax(scores))] == str(row[d.answer_column]))
        return {"accuracy": correct / len(rows), "loss": float(loss)}

    def _benchmark(self, model: nn.Module, name: str, ds: Dataset, batch_size: int) -> dict[str, float]:
        """Keyword accuracy, and the lm-eval option metrics unless task.data.score_options is false."""
        d, tok = self.cfg.data, self.tokenizer
        keywords = [str(c) for c in d.sources[name].choices]
        score_options = bool(d.score_options)
        examples, requests = [], []
        for row in ds:
            context = self.eval_context(row)
            texts, gold = self.options(name, row, keywords) if score_options else ([], -1)
            examples.append((str(row[d.answer_column]), texts, gold))
            requests += [(context, k) for k in keywords] + [(context, t) for t in texts]
        pairs = [encode_pair(tok, context, continuation) for context, continuation in requests]
        lls = iter(continuation_logprobs(model, pairs, tok.pad_token_id, batch_size))
        names = ["accuracy", "acc", "acc_norm", "acc_bytes"] if score_options else ["accuracy"]
        totals = dict.fromkeys(names, 0.0)
        for answer, texts, gold in examples:  # the scores come back in request order
            keyword_lls, option_lls = [next(lls) for _ in keywords], [next(lls) for _ in texts]
            totals["accuracy"] += float(keywords[int(np.argmax(keyword_lls))] == answer)
            if texts:
                for key, value in choice_metrics(option_lls, texts, gold).items():
                    totals[key] += value
        return {key: value / max(1, len(ds)) for key, value in totals.items()}

    # --- forgetting --------------------------------------------------------------------------------------

    forgetting_metric = "loss"

    @cached_property
    def _forgetting_rows(self) -> list[Row] | str:
        """Held-out generic text (tasks/forgetting.py), tokenised whole up to task.forgetting.max_length; the
        reason it is missing when the corpus cannot be read."""
        tok, limit = self.tokenizer, int(self.cfg.forgetting.max_length)
        texts = forgetting.generic_texts_or_reason(self.cfg.forgetting.text)
        if isinstance(texts, str):
            return texts
        return [(ids, list(ids))
                for ids in (tok(t, truncation=True, max_length=limit)["input_ids"] for t in texts)]

    def forgetting_probe(self, model: nn.Module, batch_size: int = 256, untrained: bool = False
                         ) -> dict[str, float | str] | None:
        """Causal-LM loss per token on held-out generic text, PEFT's forgetting measure
        (tasks/forgetting.py)."""
        if not self.cfg.forgetting.enabled:
            return None
        if isinstance(self._forgetting_rows, str):
            return {forgetting.GENERIC: self._forgetting_rows}
        rows, size = self._forgetting_rows, min(batch_size, int(self.cfg.forgetting.batch_size))
        total, count = 0.0, 0
        with eval_mode(model):
            for i in range(0, len(rows), size):
                nll, n = token_nll(model, pad_batch(rows[i : i + size], self.tokenizer.pad_token_id))
                total, count = total + float(nll), count + int(n)
        return {forgetting.GENERIC: total / max(1, count)}
