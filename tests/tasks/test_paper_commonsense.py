"""task=commonsense on tiny LLaMA / Qwen2 stand-ins: the official RandLoRA protocol (config values, loss mask,
validation hold-out, untruncated scoring, lm-eval acc / acc_norm) and whole runs through the runner."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict, load_from_disk
from paperstandins import causal_lm, commonsense_data, commonsense_instruction
from taskhelpers import compose_task

import tasks
import tasks.commonsense as cs
from runners.train import run
from tasks.commonsense import IGNORE, choice_metrics, encode_pair, option_texts
from tasks.models import ModelNotFoundError

BENCH = ["boolq", "piqa", "winogrande"]

# Verbatim from the official code (RandLoRA@4ac565e commonsense_reasoning/), whitespace included.
INDENT = " " * 16
LEAD = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.")
TRAIN_PROMPT = (f"{LEAD}  \n\n{INDENT}### Instruction:\n{INDENT}{{instruction}}\n{INDENT}\n"
                f"{INDENT}### Response:\n{INDENT}{{output}}")              # finetune.py:439-445
EVAL_PROMPT = (f"{LEAD} \n\n{INDENT}### Instruction:\n{INDENT}{{instruction}}\n\n"
               f"{INDENT}### Response:\n{INDENT}")                         # commonsense_evaluate.py:181-187


@pytest.fixture(scope="module")
def standins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("paper_commonsense")
    cfg = compose_task("commonsense", "size=base")
    choices = {n: list(cfg.task.data.sources[n].choices) for n in BENCH}
    labels = {n: cfg.task.data.sources[n].choice_label for n in BENCH}
    paths = commonsense_data(root, BENCH, choices, labels)
    texts = [str(cfg.task.data.train_prompt), str(cfg.task.data.eval_prompt), "the correct answer is false"]
    for name in ["train", *BENCH]:
        rows = [row for ds in load_from_disk(str(paths[name])).values() for row in ds]
        texts += [str(v) for row in rows for v in row.values()]
    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]+", t.lower())})
    paths["llama"] = causal_lm(root / "llama", words, "llama")
    paths["qwen2"] = causal_lm(root / "qwen2", words, "qwen2")
    return paths


def _overrides(paths: dict[str, Path], arch: str = "llama") -> list[str]:
    return [f"task.model.path={paths[arch]}", f"task.data.train.path={paths['train']}",
            *[f"task.data.sources.{n}.path={paths[n]}" for n in BENCH],
            f"task.data.datasets=[{','.join(BENCH)}]",
            "task.model.dtype=null", "task.model.gradient_checkpointing=false",
            "trainer.batch_size=4", "trainer.eval_batch_size=8", "trainer.warmup_steps=1", "device=cpu"]


def _task(paths: dict[str, Path], *overrides: str) -> tasks.Task:
    return tasks.build(compose_task("commonsense", "size=base", *_overrides(paths), *overrides).task)


def _save(root: Path, rows: list[dict], split: str) -> Path:
    DatasetDict({split: Dataset.from_list(rows)}).save_to_disk(root)
    return root


# --- config --------------------------------------------------------------------------------------------

def test_configs_follow_the_official_commonsense_protocol() -> None:
    base, large = compose_task("commonsense", "size=base"), compose_task("commonsense", "size=large")
    assert base.task.model.path == "Qwen/Qwen2-0.5B-Instruct"
    assert large.task.model.path == "meta-llama/Meta-Llama-3-8B"
    assert list(base.task.model.target_modules) == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    assert list(base.task.data.datasets) == ["boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e",
                                             "arc_c", "obqa"]
    t, d = base.trainer, base.task.data
    schedule = (t.lr, t.weight_decay, t.warmup_steps, t.warmup_ratio, t.schedule, t.final_lr_ratio,
                t.grad_clip)
    assert schedule == (1e-4, 0.0, 100, None, "linear", 0.0, 1.0)
    assert (t.batch_size, t.grad_accum, large.trainer.batch_size, large.trainer.grad_accum) == (16, 1, 4, 4)
    assert (d.epochs, d.max_length, d.val_set_size, d.val_seed, d.train_on_inputs) == (1, 256, 120, 42, True)
    assert base.method.dropout == 0.05 and large.method.dropout == 0.05
    assert large.task.model.dtype == "bfloat16" and large.task.model.gradient_checkpointing  # not 4-bit
    assert d.train_prompt == TRAIN_PROMPT and d.eval_prompt == EVAL_PROMPT
    assert d.response_prefix == "the correct answer is "
    sizes = {n: d.sources[n].size for n in d.datasets}
    assert sizes == {"boolq": 3270, "piqa": 1838, "siqa": 1954, "hellaswag": 10042, "winogrande": 1267,
                     "arc_e": 2376, "arc_c": 1172, "obqa": 500}
    assert list(d.sources.piqa.choices) == ["solution1", "solution2"]
    assert d.sources.arc_c.choice_label == "Answer" and d.sources.boolq.choice_label is None
    protocol = base.task.protocol
    assert "RandLoRA" in protocol.source and len(protocol.deviations) >= 5
    assert all(set(dev) == {"what", "why"} and dev.what and dev.why for dev in protocol.deviations)


# --- training ------------------------------------------------------------------------------------------

def test_loss_covers_prompt_response_and_eos_by_default(standins) -> None:
    task = _task(standins)
    batch = next(task.train_batches(4, torch.Generator().manual_seed(0)))
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"].bool()
    assert torch.equal(labels[mask], ids[mask]) and (labels[~mask] == IGNORE).all()
    eos = task.tokenizer.eos_token_id
    assert all(ids[r, int(mask[r].sum()) - 1] == eos for r in range(len(ids)))  # EOS appended and labelled
    assert torch.isfinite(task.loss(task.build_model(), batch))


def test_train_on_inputs_false_labels_the_response_and_eos_only(standins) -> None:
    task = _task(standins, "task.data.train_on_inputs=false")
    row = task.train_set[0]
    ids, labels = task.encode_train(row)
    user = len(task.tokenizer(task.train_text(row, output=""))["input_ids"])
    assert labels[:user] == [IGNORE] * user and labels[user:] == ids[user:]
    text = task.tokenizer.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE])
    assert text.startswith("the correct answer is") and text.endswith("</s>") and "instruction" not in text


def test_training_text_is_cut_at_the_cutoff_without_eos(standins) -> None:
    """finetune.py tokenize: truncation=True, max_length=cutoff_len; EOS only when there is room."""
    task = _task(standins, "task.data.max_length=12")
    ids, labels = task.encode_train(task.train_set[0])
    assert len(ids) == 12 and ids[-1] != task.tokenizer.eos_token_id and labels == ids


def test_validation_hold_out_is_the_official_split_outside_training(standins, tmp_path, caplog) -> None:
    rows = [{"instruction": f"question boolq {i} pick", "input": "", "output": "the correct answer is true",
             "answer": "true"} for i in range(300)]
    path = _save(tmp_path / "train300", rows, "train")
    task = _task(standins, f"task.data.train.path={path}")
    train, val = task.train_set["instruction"], task.val_set["instruction"]
    assert len(val) == 120 and len(train) == 180 and not set(train) & set(val) and set(train) | set(val) == {
        r["instruction"] for r in rows}
    # finetune.py:352
    official = Dataset.from_list(rows).train_test_split(test_size=120, shuffle=True, seed=42)
    assert val == official["test"]["instruction"]
    assert task.planned_steps(16) == 12  # 1 epoch of the 180 training rows at batch 16
    small = _task(standins)  # 12 rows: half held out, with a warning
    assert len(small.val_set) == 6 and len(small.train_set) == 6 and "holding out 6" in caplog.text
    none = _task(standins, "task.data.val_set_size=0")
    assert none.val_set is None and len(none.train_set) == 12


# --- scoring -------------------------------------------------------------------------------------------

def _prefer(model: torch.nn.Module, token_id: int) -> torch.nn.Module:
    """Make the stand-in predict `token_id` everywhere: its log-probability ~0, every other ~-50."""
    with torch.no_grad():
        model.lm_head.weight.zero_()
    bias = torch.zeros(model.config.vocab_size)
    bias[token_id] = 50.0
    model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    return model


def test_scoring_never_truncates_a_prompt_longer_than_the_training_cutoff(standins, tmp_path) -> None:
    """The official evaluation tokenises prompts without max_length (commonsense_evaluate.py:89). Cutting at
    the training cutoff (16 here) would drop the answer tokens and tie every keyword (-> "true")."""
    long = " ".join(["question boolq pick the answer"] * 10) + " Answer format: true/false"
    rows = [{"instruction": long, "input": "", "output": "", "answer": "false"}] * 3
    path = _save(tmp_path / "long_boolq", rows, "test")
    task = _task(standins, "task.data.max_length=16", f"task.data.sources.boolq.path={path}", "dataset=boolq",
                 "task.data.val_set_size=0")
    prompt = task.eval_context(task.test_sets["boolq"][0])
    context, continuation = encode_pair(task.tokenizer, prompt, "false")
    assert len(context) > 16 and task.tokenizer.decode(continuation).strip() == "false"
    model = _prefer(task.build_model(), task.tokenizer.convert_tokens_to_ids("false"))
    metrics = task.evaluate_metrics(model, 8)["boolq"]
    assert metrics["accuracy"] == 1.0 and metrics["acc"] == 1.0 and metrics["acc_norm"] == 1.0


def test_scoring_picks_the_likeliest_keyword(standins) -> None:
    task = _task(standins, "dataset=boolq", "task.data.val_set_size=0")
    model = _prefer(task.build_model(), task.tokenizer.convert_tokens_to_ids("true"))
    gold = task.test_sets["boolq"]["answer"]
    assert task.evaluate(model, 4)["boolq"] == pytest.approx(gold.count("true") / len(gold))


def test_encode_pair_moves_trailing_spaces_to_the_continuation(standins) -> None:
    tok = _task(standins).tokenizer
    assert encode_pair(tok, "the correct answer is ", "true") == (tok("the correct answer is")["input_ids"],
                                                                  tok(" true")["input_ids"])


def test_option_texts_of_llm_adapters_instructions() -> None:
    wino = ("Please choose ... so _ always won.\n\nOption1: Sarah Option2: Maria Answer format: "
            "option1/option2")
    piqa = "Please choose the correct solution: q?\n\nSolution1: a b.\n\nSolution2: c\n\nAnswer format: x"
    assert option_texts(wino, "Option") == {1: "Sarah", 2: "Maria"}
    assert option_texts(piqa, "Solution") == {1: "a b.", 2: "c"}
    arc = "Answer1: x Answer2: y z Answer3: w\n\nAnswer format: answer1/answer2/answer3"
    assert option_texts(arc, "Answer") == {1: "x", 2: "y z", 3: "w"}


def test_acc_and_acc_norm_differ_when_options_differ_in_length(standins, tmp_path, monkeypatch) -> None:
    """lm-eval: acc = argmax sum log p; acc_norm = argmax sum log p / len(option) (characters)."""
    assert choice_metrics([-10.0, -2.0], ["one two three four five six", "cat"], gold=0) == {
        "acc": 0.0, "acc_norm": 1.0, "acc_bytes": 1.0}
    # "éé": 2 characters, 4 UTF-8 bytes: per character it loses, per byte it wins
    assert choice_metrics([-2.5, -3.3], ["éé", "abc"], gold=0) == {"acc": 1.0, "acc_norm": 0.0,
                                                                   "acc_bytes": 1.0}
    instruction = commonsense_instruction("piqa", 0, ["solution1", "solution2"], "Solution").replace(
        "Solution1: cat", "Solution1: one two three four five six")
    rows = [{"instruction": instruction, "input": "", "output": "", "answer": "solution1"}]
    path = _save(tmp_path / "piqa", rows, "test")
    task = _task(standins, f"task.data.sources.piqa.path={path}", "dataset=piqa", "task.data.val_set_size=0")
    # the log-prob source: -1 per continuation token (the long option loses on the sum, wins per character)
    monkeypatch.setattr(cs, "continuation_logprobs",
                        lambda model, pairs, pad, bs: [-1.0 * len(c) for _, c in pairs])
    metrics = task.evaluate_metrics(torch.nn.Linear(1, 1), 8)["piqa"]
    assert (metrics["acc"], metrics["acc_norm"], metrics["acc_bytes"]) == (0.0, 1.0, 1.0)
    assert metrics["accuracy"] == 1.0  # the keywords tie (one token each): the first, solution1


# --- whole runs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,method", [("llama", "lora"), ("qwen2", "randlora")])
def test_commonsense_base_runs_on_standins(standins, tiny_overrides, arch: str, method: str) -> None:
    cfg = compose_task("commonsense", "size=base", f"method={method}", *_overrides(standins, arch),
                       "task.model.gradient_checkpointing=true", *tiny_overrides)
    record = run(cfg)
    assert record["run"]["status"] == "success" and record["run"]["hp"]["dropout"] == 0.05
    assert record["run"]["protocol"]["deviations"] and "RandLoRA" in record["run"]["protocol"]["source"]
    metrics = record["metrics"]["per_dataset_metrics"]
    assert set(metrics) == set(BENCH)
    for m in metrics.values():
        assert set(m) == {"accuracy", "acc", "acc_norm", "acc_bytes", "val_loss"}
        assert all(0.0 <= m[k] <= 1.0 for k in ("accuracy", "acc", "acc_norm", "acc_bytes"))
        assert m["val_loss"] > 0
    assert record["metrics"]["per_dataset"] == {n: m["accuracy"] for n, m in metrics.items()}
    assert record["metrics"]["eval_examples"] == dict.fromkeys(BENCH, 6)  # commonsense_data's n_test


def test_unreachable_model_and_missing_data_are_one_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = tasks.build(compose_task("commonsense", "size=base", "dataset=piqa").task)
    message = r"Qwen/Qwen2-0\.5B-Instruct.*could not be reached.*task\.model\.path"
    with pytest.raises(ModelNotFoundError, match=message):
        task.build_model()
    with pytest.raises(FileNotFoundError, match=r"piqa.*task\.data\.sources\.piqa\.path"):
        _ = task.test_sets
    with pytest.raises(FileNotFoundError, match=r"task\.data\.train\.path"):
        _ = task.train_set
