"""Forgetting (tasks/forgetting.py): recorded for clip / language / commonsense, equal to the probe computed
independently, exactly 0 without training, larger for aggressive full fine-tuning than for head-only."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from matplotlib.container import ErrorbarContainer
from omegaconf import OmegaConf
from rbtest import compose_config

import methods
import tasks
from runners.train import run
from tasks import forgetting
from tasks.models import HeadedModel, resolve_model_path

CLIP_OTHERS = ["colors", "digits", "textures", "counts"]  # conf/task/clip/tiny.yaml minus shapes
FAST = ["logger=none", "trainer.log_every=2", "trainer.timing_warmup=1", "trainer.checkpoint_every=0",
        "trainer.batch_size=16", "task.data.train_size=64", "task.data.test_size=32", "threads=1"]


def _run(tmp_path: Path, *overrides: str, steps: int = 4) -> dict:
    return run(compose_config([*FAST, f"trainer.max_steps={steps}", f"out_dir={tmp_path}", *overrides]))


# --- pure pieces ---------------------------------------------------------------------------------------

def test_forgetting_is_positive_when_knowledge_is_lost() -> None:
    acc = forgetting.forgetting_metrics({"a": 0.8, "b": 0.5}, {"a": 0.6, "b": 0.6}, "accuracy")
    assert acc["forgetting"] == pytest.approx((0.2 - 0.1) / 2)
    assert acc["forgetting_per_dataset"] == {"a": {"before": 0.8, "after": 0.6},
                                             "b": {"before": 0.5, "after": 0.6}}
    assert forgetting.forgetting_metrics({"t": 2.0}, {"t": 2.5}, "loss")["forgetting"] == pytest.approx(0.5)
    assert forgetting.forgetting_metrics(None, None, "loss") == {}


def test_clip_probe_is_the_suite_minus_the_trained_dataset_capped() -> None:
    cfg = compose_config(["task=clip", "dataset=shapes", "task.data.test_size=32",
                          "task.forgetting.max_examples=10"])
    sub = forgetting.other_datasets_config(cfg.task)
    assert list(sub.data.datasets) == CLIP_OTHERS and sub.dataset is None and sub.data.test_size == 10
    tuning = compose_config(["task=clip", "dataset=shapes", "task.data.eval_split=validation"]).task
    assert forgetting.other_datasets_config(tuning).data.eval_split == "test"  # the same sets as a final run
    whole = compose_config(["task=clip"]).task  # a run over the whole suite has no "other" datasets
    assert forgetting.other_datasets_config(whole) is None
    off = compose_config(["task=clip", "dataset=shapes", "task.forgetting.enabled=false"]).task
    assert forgetting.other_datasets_config(off) is None
    bad = compose_config(["task=clip", "dataset=shapes", "task.forgetting.max_examples=0"]).task
    with pytest.raises(ValueError, match=r"task\.forgetting\.max_examples=0 .*positive integer or null"):
        forgetting.other_datasets_config(bad)


def test_a_probe_set_that_cannot_be_loaded_is_recorded_missing_and_left_out_of_the_mean() -> None:
    before = {"a": 0.8, "b": "FileNotFoundError: no such folder"}
    after = {"a": 0.5, "b": "FileNotFoundError: no such folder"}
    out = forgetting.forgetting_metrics(before, after, "accuracy")
    assert out["forgetting"] == pytest.approx(0.3)
    assert out["forgetting_per_dataset"]["b"] == {"before": None, "after": None,
                                                  "missing": "FileNotFoundError: no such folder"}
    nothing = forgetting.forgetting_metrics({"b": "why"}, {"b": "why"}, "accuracy")
    assert nothing["forgetting"] is None and nothing["forgetting_per_dataset"]["b"]["missing"] == "why"


def test_generic_text_from_a_local_corpus_and_clear_errors(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    rows = ["First one. Second one.", " ", "Third. Fourth.", "Fifth. Sixth."]
    DatasetDict({"train": Dataset.from_dict({"body": rows})}).save_to_disk(tmp_path / "wiki")
    text = {"path": str(tmp_path / "wiki"), "config": None, "split": "train", "column": "body", "rows": 2}
    assert forgetting.generic_texts(OmegaConf.create(text)) == ["First one. Second one.", "Third. Fourth."]
    assert forgetting.sentence_pairs(rows[2:]) == [("Third.", "Fourth."), ("Fifth.", "Sixth.")]
    with pytest.raises(ValueError,
                       match=r"path='someone/corpus' is a hub corpus: set task\.forgetting\.text\.rows"):
        forgetting.generic_texts(OmegaConf.create({**text, "path": "someone/corpus", "rows": None}))
    with pytest.raises(FileNotFoundError,
                       match=r"could not read the forgetting probe's text .*column 'text'"):
        forgetting.generic_texts(OmegaConf.create({**text, "column": "text"}))


def test_unknown_language_objective_is_one_clear_error() -> None:
    cfg = compose_config(["task=language", "task.forgetting.objective=perplexity"]).task
    with pytest.raises(ValueError, match=r"objective='perplexity'; valid: contrastive, mlm"):
        forgetting.EncoderProbe(cfg.forgetting, cfg.model.path, None)


# --- whole runs -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_clip_run_probes_the_other_datasets_as_an_independent_evaluation_does(tmp_path: Path) -> None:
    record = _run(tmp_path, "task=clip", "method=lora", "dataset=shapes")
    per = record["metrics"]["forgetting_per_dataset"]
    assert list(per) == CLIP_OTHERS  # never the dataset it trained on
    others = tasks.build(
        compose_config([*FAST, "task=clip", f"task.data.datasets=[{','.join(CLIP_OTHERS)}]"]).task)
    model = others.build_model()
    torch.set_num_threads(1)
    assert others.evaluate(model) == {k: v["before"] for k, v in per.items()}
    methods.load_adapter(model, tmp_path / "adapter")  # the trained adapter, read back from disk
    assert others.evaluate(model) == {k: v["after"] for k, v in per.items()}
    drop = np.mean([v["before"] - v["after"] for v in per.values()])
    assert record["metrics"]["forgetting"] == pytest.approx(drop, abs=1e-12)
    saved = json.loads((tmp_path / "results.json").read_text())["metrics"]
    assert saved["forgetting"] == record["metrics"]["forgetting"] and saved["forgetting_per_dataset"] == per


def test_untrained_zero_shot_scores_are_evaluated_once_per_process(tmp_path: Path, monkeypatch) -> None:
    """The "before" probe of a second run (another method, another dataset of the suite) evaluates only the
    dataset the first did not probe, and its scores equal a fresh pretrained model's evaluation."""
    from tasks import clip

    monkeypatch.setattr(clip, "UNTRAINED_ACCURACY", {})
    probed, real = [], clip.ClipTask.evaluate
    monkeypatch.setattr(clip.ClipTask, "evaluate", lambda self, model, batch_size=256, names=None:
                        (probed.append(list(names)) if names is not None else None)
                        or real(self, model, batch_size, names))
    _run(tmp_path / "a", "task=clip", "method=lora", "dataset=shapes")
    second = _run(tmp_path / "b", "task=clip", "method=randlora",
                  "dataset=colors")["metrics"]["forgetting_per_dataset"]
    second_others = ["shapes", "digits", "textures", "counts"]
    # before, after of run 1; before of run 2 (only shapes: the others came from run 1), after of run 2
    assert probed == [CLIP_OTHERS, CLIP_OTHERS, ["shapes"], second_others]
    everything = ["shapes", *CLIP_OTHERS]
    fresh = tasks.build(
        compose_config([*FAST, "task=clip", f"task.data.datasets=[{','.join(everything)}]"]).task)
    model = fresh.build_model()
    torch.set_num_threads(1)
    scores = real(fresh, model)
    assert {d: v["before"] for d, v in second.items()} == {d: scores[d] for d in second}
    assert set(second) == set(everything) - {"colors"}


@pytest.mark.slow
@pytest.mark.parametrize("task,dataset", [("clip", "digits"), ("language", "sentiment")])
def test_zero_training_steps_forget_exactly_nothing(tmp_path: Path, task: str, dataset: str) -> None:
    metrics = _run(tmp_path, f"task={task}", "method=lora", f"dataset={dataset}", steps=0)["metrics"]
    assert metrics["forgetting"] == 0.0
    assert all(v["before"] == v["after"] for v in metrics["forgetting_per_dataset"].values())


def _minilm_contrastive_loss(pairs: list[tuple[str, str]]) -> float:
    """all-MiniLM-L6-v2's own objective written out with transformers alone: mean-pooled, cosine x 20,
    cross entropy against the true pair over the whole set."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path("minilm")
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    def embed(texts: list[str]) -> torch.Tensor:
        inputs = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    sim = 20.0 * embed([a for a, _ in pairs]) @ embed([b for _, b in pairs]).T
    return float(F.cross_entropy(sim, torch.arange(len(pairs))))


@pytest.mark.slow
def test_language_forgetting_is_minilm_contrastive_loss_on_held_out_text(tmp_path: Path) -> None:
    metrics = _run(tmp_path, "task=language", "method=lora", "dataset=sentiment")["metrics"]
    probe = metrics["forgetting_per_dataset"]["generic_text"]
    passages = json.loads(forgetting.PASSAGES.read_text())["passages"]
    pairs = [(a + ".", b) for a, _, b in (p.partition(". ") for p in passages)]
    assert probe["before"] == pytest.approx(_minilm_contrastive_loss(pairs), rel=1e-4)
    assert probe["before"] < 0.5 * np.log(len(pairs))  # the pretrained encoder pairs them far above chance
    assert metrics["forgetting"] == pytest.approx(probe["after"] - probe["before"], abs=1e-12)


@pytest.mark.slow
def test_high_lr_full_fine_tuning_forgets_more_than_head_only(tmp_path: Path) -> None:
    """Head-only training leaves the encoder as it was (forgetting exactly 0); full fine-tuning at 10x its
    usual lr moves it and the probe must see that. A probe that ignores the encoder fails one of the two."""
    base = ["task=language", "dataset=sentiment"]
    head_only = _run(tmp_path / "none", *base, "method=none")["metrics"]["forgetting"]
    full = _run(tmp_path / "full", *base, "method=full",
                "trainer.method_lr.full=1e-3")["metrics"]["forgetting"]
    assert head_only == 0.0
    assert full > 0.05  # 0.34 measured (4 steps, seed 0)


# --- the decoder-LM and MLM probes on tiny stand-ins of the paper models --------------------------------

def test_commonsense_probe_is_causal_lm_loss_per_token(tmp_path: Path) -> None:
    from paperstandins import causal_lm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    passages = json.loads(forgetting.PASSAGES.read_text())["passages"]
    words = sorted({w for p in passages for w in p.lower().replace(".", " . ").replace(",", " , ").split()})
    path = causal_lm(tmp_path / "lm", words, arch="qwen2")
    task = tasks.build(compose_config(["task=commonsense", "size=base", f"task.model.path={path}"]).task)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    value = task.forgetting_probe(model)["generic_text"]
    tok, total, count = AutoTokenizer.from_pretrained(path), 0.0, 0
    with torch.no_grad():
        for text in passages:  # one text at a time: no padding involved
            ids = tok(text, return_tensors="pt")["input_ids"]
            total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert value == pytest.approx(total / count, rel=1e-5)
    assert task.forgetting_metric == "loss"


def _tiny_roberta(path: Path, with_mlm_head: bool) -> Path:
    from paperstandins import TINY, word_tokenizer
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaModel

    passages = json.loads(forgetting.PASSAGES.read_text())["passages"]
    specials = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
                "cls_token": "<s>", "sep_token": "</s>", "mask_token": "<mask>"}
    tok = word_tokenizer([" ".join(passages)], specials, pair_template=True)
    torch.manual_seed(0)
    config = RobertaConfig(**TINY, vocab_size=len(tok), max_position_embeddings=160,
                           pad_token_id=tok.pad_token_id, type_vocab_size=1)
    model = RobertaForMaskedLM(config) if with_mlm_head else RobertaModel(config, add_pooling_layer=False)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_mlm_probe_is_the_checkpoints_own_masked_lm_loss(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, RobertaForMaskedLM, RobertaModel

    path = _tiny_roberta(tmp_path / "roberta", with_mlm_head=True)
    cfg = compose_config(["task=language", "size=base", f"task.model.path={path}"]).task
    tok = AutoTokenizer.from_pretrained(path)
    model = HeadedModel(RobertaModel.from_pretrained(path, add_pooling_layer=False), 32, {"x": 2}, pool="cls")
    probe = forgetting.EncoderProbe(cfg.forgetting, str(path), tok)
    value = probe(model, batch_size=7)["generic_text"]
    assert probe(model, batch_size=48)["generic_text"] == pytest.approx(value, rel=1e-5)  # same masks
    rows = forgetting.masked_inputs(tok, probe.texts, 128, 0.15, 0)
    ids, labels, mask = forgetting._pad(rows, tok.pad_token_id)
    with torch.no_grad():  # the reference: the whole pretrained MLM model's own loss on the same masks
        reference = RobertaForMaskedLM.from_pretrained(path).eval()(input_ids=ids, attention_mask=mask,
                                                                    labels=labels)
    assert value == pytest.approx(float(reference.loss), rel=1e-5)


def test_mlm_probe_without_a_pretrained_head_measures_nothing(tmp_path: Path, caplog) -> None:
    from transformers import AutoTokenizer, RobertaModel

    path = _tiny_roberta(tmp_path / "bare", with_mlm_head=False)
    cfg = compose_config(["task=language", "size=base", f"task.model.path={path}"]).task
    model = HeadedModel(RobertaModel.from_pretrained(path, add_pooling_layer=False), 32, {"x": 2}, pool="cls")
    probe = forgetting.EncoderProbe(cfg.forgetting, str(path), AutoTokenizer.from_pretrained(path))
    assert probe(model, batch_size=16) is None  # a freshly initialised head would measure noise
    assert "no pretrained MLM head" in caplog.text


# --- the report figure ------------------------------------------------------------------------------

def _synthetic_runs(with_forgetting: bool = True) -> pd.DataFrame:
    """Two methods x two budgets x two seeds of one panel, forgetting growing with the budget."""
    rows = []
    for m, method in enumerate(["lora", "randlora"]):
        for budget in (1000, 4000):
            for seed in (0, 1):
                rows.append({"task": "clip", "size": "tiny", "model": "tiny-clip", "regime": "full",
                             "method": method, "method_kind": "adapter", "method_label": method.upper(),
                             "budget_target": budget, "setting": f"b{budget}", "lr": 1e-3,
                             "seed": seed, "status": "success", "source": f"{method}-{budget}-{seed}",
                             "dataset": "shapes", "accuracy": 0.5, "accuracy_before": 0.4,
                             "mean_accuracy": 0.5 + 0.1 * m + 0.01 * seed, "mean_accuracy_before": 0.4,
                             "forgetting": budget / 1e5 + 0.01 * m + 0.002 * seed,
                             "trainable_params": budget})
    df = pd.DataFrame(rows)
    return df if with_forgetting else df.drop(columns="forgetting")


def test_forgetting_figure_plots_gain_against_forgetting_per_method_and_budget() -> None:
    from analysis import plots

    fig = plots.fig_forgetting(_synthetic_runs())
    ax = fig.axes[0]
    bars = {name: h for h, name in zip(*ax.get_legend_handles_labels(), strict=True)
            if isinstance(h, ErrorbarContainer)}
    assert set(bars) == {"LORA", "RANDLORA"}  # each method under its recorded label
    x, y = bars["RANDLORA"].lines[0].get_data()
    assert sorted(np.asarray(x, dtype=float)) == pytest.approx([100 * (0.01 + 0.01 + 0.001),
                                                                100 * (0.04 + 0.01 + 0.001)])
    assert np.allclose(y, 100 * (0.6 + 0.005 - 0.4))  # gain = after - before, seed mean, in points
    assert bars["RANDLORA"].has_xerr and bars["RANDLORA"].has_yerr
    assert "accuracy lost" in ax.get_xlabel() and "tiny-clip" in ax.get_title()


def test_forgetting_figure_is_skipped_without_measurements() -> None:
    from analysis import plots

    with pytest.raises(ValueError, match="no forgetting measurements"):
        plots.fig_forgetting(_synthetic_runs(with_forgetting=False))
    no_values = _synthetic_runs().assign(forgetting=np.nan)
    with pytest.raises(ValueError, match="no forgetting measurements"):
        plots.fig_forgetting(no_values)


def test_an_unreadable_generic_corpus_is_a_missing_probe_not_a_failed_run(tmp_path: Path, caplog) -> None:
    cfg = compose_config(["task=language", f"task.forgetting.text.path={tmp_path / 'gone.jsonl'}",
                          "task.forgetting.text.rows=5"]).task
    probe = forgetting.EncoderProbe(cfg.forgetting, cfg.model.path, None)
    scores = probe(torch.nn.Linear(1, 1), 8)
    assert list(scores) == [forgetting.GENERIC] and "gone.jsonl" in scores[forgetting.GENERIC]
    assert "recorded as missing" in caplog.text
    per = forgetting.forgetting_metrics(scores, scores, "loss")["forgetting_per_dataset"]
    entry = per[forgetting.GENERIC]
    assert entry["before"] is None and "gone.jsonl" in entry["missing"]
    bad = compose_config(["task=language", "task.forgetting.text.rows=0"]).task  # a bad setting still stops
    with pytest.raises(ValueError, match="rows=0"):
        forgetting.EncoderProbe(bad.forgetting, bad.model.path, None)
