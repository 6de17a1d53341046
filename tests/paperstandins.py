"""Small local stand-ins for the paper-scale models and datasets (no network here or in CI).

Each builder writes, with the real classes' `save_pretrained` / `save_to_disk`, a folder shaped like the
hub original (same model class, same split and column names), so `size=base` runs its real code path on
it through `task.model.path=` / `task.data.sources.<name>.path=` overrides. Models are random and tiny
(hidden 32, 2 layers): these tests check plumbing, not accuracy.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


# --- tokenizers --------------------------------------------------------------------------------------

def word_tokenizer(texts: list[str], specials: dict[str, str], pair_template: bool = False):
    """A word-level fast tokenizer over the words of `texts`, built offline with `tokenizers`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in t.lower().replace(".", " . ").replace("?", " ? ").split()})
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys([*specials.values(), *words]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if pair_template:  # RoBERTa's <s> A </s></s> B </s>
        bos, eos = specials["bos_token"], specials["eos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
            special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


# --- images ------------------------------------------------------------------------------------------

def _image(rng: np.random.Generator, label: int, mode: str = "RGB") -> PILImage.Image:
    """A PIL image whose mean colour depends on the label, of a random size (processors must resize)."""
    h, w = (int(x) for x in rng.integers(24, 48, size=2))
    base = np.full((h, w, 3), 40 + 50 * (label % 4), dtype=np.uint8)
    noise = rng.integers(0, 30, size=(h, w, 3), dtype=np.uint8)
    return PILImage.fromarray(base + noise).convert(mode)


def image_dataset(path: Path, classes: list[str], splits: dict[str, int], image_column: str = "image",
                  label_column: str = "label", class_label: bool = True, mode: str = "RGB",
                  seed: int = 0) -> Path:
    """A save_to_disk DatasetDict shaped like a hub image-classification dataset."""
    rng = np.random.default_rng(seed)
    label_feature = ClassLabel(names=classes) if class_label else Value("int64")
    features = Features({image_column: Image(), label_column: label_feature})
    dd = {}
    for split, n in splits.items():
        ys = [i % len(classes) for i in range(n)]
        dd[split] = Dataset.from_dict({image_column: [_image(rng, y, mode) for y in ys], label_column: ys},
                                      features=features)
    DatasetDict(dd).save_to_disk(path)
    return path


def curated(name: str) -> list[str]:
    """The official code's class names of `name` (tasks/assets/prompts/randlora_clip22.json)."""
    table = json.loads((Path(__file__).resolve().parents[1] / "tasks" / "assets" / "prompts" /
                        "randlora_clip22.json").read_text())
    return list(table[name]["classes"])


# --- hub-shaped copies built from what each hub copy publishes (tests/fixtures/hub/*.json) ------------

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hub"


def hub_facts(suite: str) -> dict[str, dict]:
    """tests/fixtures/hub/<suite>.json: per dataset, what its hub copy publishes, each fact with its
    source."""
    return {k: v for k, v in read_json(FIXTURES / f"{suite}.json").items() if not k.startswith("_")}


def published_names(name: str, facts: dict) -> list[str]:
    """The copy's label names in label order: the complete published list, else the published head followed
    by the official names for the unread rest (the fixture says which)."""
    names = facts["names"]
    if names.get("values") is not None:
        return list(names["values"])
    return list(names["head"]) + curated(name)[len(names["head"]):]


def _spread(low: int, high: int, n: int) -> list[int]:
    """n labels in low..high: every label in turn when n covers them all, else evenly spaced, both ends
    included."""
    count = high - low + 1
    if n >= count or n < 2:
        return [low + i % count for i in range(n)]
    return [low + round(i * (count - 1) / (n - 1)) for i in range(n)]


def hub_standin(path: Path, name: str, facts: dict, rows: int = 8, mode: str = "RGB", seed: int = 0) -> Path:
    """A save_to_disk copy shaped as its fixture says the hub copy is: its split names, image and label
    columns, label dtype and range (caltech256's 1..257 included), ClassLabel names, a `text` column of
    names, or a webdataset's integer `cls` plus its classnames.txt. `rows` examples per split span the label
    range."""
    rng = np.random.default_rng(seed)
    names, kind = published_names(name, facts), facts["names"]["kind"]
    low, high = facts["label"]["min"], facts["label"]["max"]
    image, label = facts["image_column"], facts["label_column"]
    features = {image: Image(), label: ClassLabel(names=names) if kind == "ClassLabel" else Value("int64")}
    if kind == "text_column":
        features[facts["names"]["column"]] = Value("string")
    dd = {}
    for split in facts["splits"]:
        ys = _spread(low, high, rows)
        columns = {image: [_image(rng, y, mode) for y in ys], label: ys}
        if kind == "text_column":
            columns[facts["names"]["column"]] = [names[y - low] for y in ys]
        dd[split] = Dataset.from_dict(columns, features=Features(features))
    DatasetDict(dd).save_to_disk(path)
    if kind == "classnames.txt":
        (path / "classnames.txt").write_text("\n".join(names) + "\n")
    return path


def clip_model(path: Path) -> Path:
    """A random tiny CLIPModel + CLIPImageProcessor + a word-level tokenizer, via save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    words = [("a photo of the number zero one two three four five six seven eight nine , type car bird food "
              "texture satellite i took in sedan coupe truck van red blue green apple pear plum fig kiwi")]
    tok = word_tokenizer(words, {"unk_token": "<unk>", "pad_token": "<pad>", "bos_token": "<s>",
                                 "eos_token": "</s>"})
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(TINY, vocab_size=len(tok), max_position_embeddings=32, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        vision_config=dict(TINY, image_size=32, patch_size=8), projection_dim=32)
    CLIPModel(config).save_pretrained(path)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def dinov2_model(path: Path) -> Path:
    """A random tiny Dinov2Model + its image processor (BitImageProcessor, as facebook/dinov2-base)."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(**TINY, image_size=28, patch_size=14)).save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(path)
    return path


# --- GLUE --------------------------------------------------------------------------------------------

GLUE_WORDS = ["the", "movie", "was", "good", "bad", "great", "awful", "fine", "a", "cat", "sat", "on", "mat",
              "dog", "ran", "is", "it", "true", "that", "yes", "no"]


def glue_standin(path: Path, facts: dict, seed: int = 0) -> Path:
    """A GLUE config's copy shaped as tests/fixtures/hub/glue.json says nyu-mll/glue publishes it."""
    return glue_dataset(path, facts["text_columns"], facts["names"]["values"], seed)


def glue_dataset(path: Path, columns: list[str], names: list[str], seed: int = 0) -> Path:
    """nyu-mll/glue-shaped DatasetDict: train / validation / test (test labels -1, as on the hub); `names`
    the ClassLabel names, none for a regression target (float32 in [0, 5], STS-B)."""
    rng = np.random.default_rng(seed)
    regression = not names
    feature = Value("float32") if regression else ClassLabel(names=names)
    features = Features({**{c: Value("string") for c in columns}, "label": feature, "idx": Value("int32")})
    dd = {}
    for split, n in {"train": 48, "validation": 24, "test": 8}.items():
        rows = {c: [" ".join(rng.choice(GLUE_WORDS, size=6)) for _ in range(n)] for c in columns}
        if regression:
            ys = [float(x) for x in rng.uniform(0, 5, size=n)]
        else:
            ys = [int("good" in t or "great" in t) for t in rows[columns[0]]]
        if split == "test":
            ys = [-1.0 if regression else -1] * n
            feature_test = features.copy()
            feature_test["label"] = Value("float32") if regression else Value("int64")
            dd[split] = Dataset.from_dict({**rows, "label": ys, "idx": list(range(n))}, features=feature_test)
            continue
        dd[split] = Dataset.from_dict({**rows, "label": ys, "idx": list(range(n))}, features=features)
    DatasetDict(dd).save_to_disk(path)
    return path


def roberta_model(path: Path) -> Path:
    """A random tiny RobertaModel + a word-level RoBERTa-style tokenizer (<s> A </s></s> B </s>)."""
    from transformers import RobertaConfig, RobertaModel

    specials = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
                "cls_token": "<s>", "sep_token": "</s>"}
    tok = word_tokenizer([" ".join(GLUE_WORDS)], specials, pair_template=True)
    torch.manual_seed(0)
    config = RobertaConfig(**TINY, vocab_size=len(tok), max_position_embeddings=64,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, type_vocab_size=1)
    RobertaModel(config, add_pooling_layer=False).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# --- commonsense reasoning ---------------------------------------------------------------------------

OPTION_WORDS = ["cat", "dog sat", "a red apple", "the mat is blue", "one two three four five"]


def commonsense_instruction(name: str, i: int, keywords: list[str], label: str | None) -> str:
    """An instruction shaped like LLM-Adapters' dataset/<name>/test.json ones: the question, the options
    as "<Label>1: ... <Label>2: ..." (none for BoolQ) and "Answer format: k1/k2"."""
    options = "".join(f" {label}{k + 1}: {OPTION_WORDS[k]}" for k in range(len(keywords))) if label else ""
    return f"question {name} {i} pick the answer{options} Answer format: {'/'.join(keywords)}"


def commonsense_data(root: Path, names: list[str], choices: dict[str, list[str]],
                     labels: dict[str, str | None] | None = None, n_test: int = 6,
                     n_train: int = 4) -> dict[str, Path]:
    """LLM-Adapters-shaped sets saved as DatasetDicts: a commonsense_15k-style train split (instruction,
    input, output, answer; `n_train` rows per benchmark) and one test split per benchmark."""
    rng = np.random.default_rng(0)
    labels = labels or {}
    out = {}
    rows = []
    for name in names:
        for i in range(n_train):
            answer = choices[name][i % len(choices[name])]
            rows.append({"instruction": commonsense_instruction(name, i, choices[name], labels.get(name)),
                         "input": "", "output": f"the correct answer is {answer}", "answer": answer})
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(root / "train")
    out["train"] = root / "train"
    for name in names:
        test = []
        for _ in range(n_test):
            instruction = commonsense_instruction(name, int(rng.integers(9)), choices[name], labels.get(name))
            test.append({"instruction": instruction, "input": "", "output": "",
                         "answer": choices[name][int(rng.integers(len(choices[name])))]})
        DatasetDict({"test": Dataset.from_list(test)}).save_to_disk(root / name)
        out[name] = root / name
    return out


def causal_lm(path: Path, words: list[str], arch: str = "llama") -> Path:
    """A random tiny LlamaForCausalLM (or Qwen2ForCausalLM) + a lower-casing word-level tokenizer over
    `words` (pass them split as the tokenizer splits: words and punctuation runs), via save_pretrained."""
    from tokenizers import normalizers
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = word_tokenizer([" ".join(words)], {"unk_token": "<unk>", "pad_token": "<pad>", "bos_token": "<s>",
                                             "eos_token": "</s>"})
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    cls, config_cls = {"llama": (LlamaForCausalLM, LlamaConfig),
                       "qwen2": (Qwen2ForCausalLM, Qwen2Config)}[arch]
    torch.manual_seed(0)
    config = config_cls(**TINY, num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id)
    cls(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
