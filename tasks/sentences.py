"""The embedded sentence-classification datasets, generated deterministically from word lists.

Train, validation and test sentences draw their label-bearing words from three *disjoint* lists
(validation and test use synonyms and related words never seen in training, each its own), so only a
pretrained encoder's knowledge of words carries a
classifier from one to the other. Negations (sentiment) and distractor words (topic) keep a
bag-of-words probe from solving the tasks outright, leaving room for adaptation to help.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from datasets import ClassLabel, Dataset, Features, Value

Words = dict[str, tuple[list[str], list[str], list[str]]]  # class -> (train, test, validation words)
#: split name -> index into a word-list tuple
SPLITS = {"train": 0, "test": 1, "validation": 2}

SENTIMENT: Words = {
    "negative": (["bad", "awful", "terrible", "poor", "horrible", "boring", "unpleasant", "dreadful"],
                 ["atrocious", "dismal", "lousy", "abysmal", "mediocre", "disappointing", "appalling",
                  "tedious"],
                 ["shoddy", "subpar", "wretched", "lame", "inferior", "unbearable", "bleak", "dire"]),
    "positive": (["good", "great", "nice", "excellent", "wonderful", "enjoyable", "pleasant", "fantastic"],
                 ["superb", "delightful", "marvelous", "brilliant", "splendid", "lovely", "outstanding",
                  "charming"],
                 ["terrific", "fabulous", "amazing", "awesome", "exquisite", "stellar", "impressive",
                  "glorious"]),
}
NOUNS = (["movie", "meal", "hotel", "service", "book", "concert", "trip", "phone"],
         ["film", "dinner", "resort", "staff", "novel", "show", "vacation", "camera"],
         ["album", "lunch", "hostel", "tour", "podcast", "play", "flight", "museum"])
TOPIC: Words = {
    "sports": (["football", "goal", "referee", "stadium", "team", "coach", "tennis", "match"],
               ["basketball", "quarterback", "umpire", "tournament", "athlete", "soccer", "league", "medal"],
               ["hockey", "golf", "baseball", "cricket", "marathon", "olympics", "rugby", "goalkeeper"]),
    "food": (["pasta", "soup", "bread", "chef", "kitchen", "recipe", "cheese", "salad"],
             ["sushi", "dessert", "bakery", "noodles", "omelette", "restaurant", "sandwich", "cuisine"],
             ["pizza", "burger", "steak", "pancake", "curry", "menu", "grill", "breakfast"]),
    "technology": (["computer", "software", "laptop", "internet", "robot", "battery", "chip", "app"],
                   ["smartphone", "algorithm", "processor", "website", "database", "keyboard", "server",
                    "gadget"],
                   ["tablet", "browser", "network", "printer", "monitor", "download", "router", "hardware"]),
    "weather": (["rain", "storm", "snow", "wind", "cloud", "sunshine", "thunder", "fog"],
                ["hurricane", "blizzard", "drizzle", "hail", "tornado", "humidity", "frost", "monsoon"],
                ["lightning", "breeze", "sleet", "rainbow", "cyclone", "heatwave", "mist", "downpour"]),
}
EMOTION: Words = {
    "joy": (["happy", "glad", "cheerful", "joyful"], ["elated", "ecstatic", "thrilled", "overjoyed"],
            ["delighted", "content", "jubilant", "blissful"]),
    "anger": (["angry", "mad", "furious", "annoyed"], ["irate", "livid", "enraged", "irritated"],
              ["outraged", "resentful", "indignant", "hostile"]),
    "fear": (["scared", "afraid", "frightened", "nervous"], ["terrified", "petrified", "anxious", "alarmed"],
             ["fearful", "panicked", "worried", "uneasy"]),
    "sadness": (["sad", "unhappy", "depressed", "gloomy"],
                ["heartbroken", "sorrowful", "miserable", "downcast"],
                ["tearful", "despondent", "melancholy", "grieving"]),
}
PEOPLE = ("she", "he", "my friend", "the teacher", "our neighbour", "my sister", "the driver")
EVENTS = ("the news arrived", "the letter came", "the door opened", "the phone rang",
          "the results were posted")


def _pick(rng: np.random.Generator, xs: list[str] | tuple[str, ...]) -> str:
    return xs[rng.integers(len(xs))]


def _sentiment(rng: np.random.Generator, split: int) -> tuple[str, int]:
    y = int(rng.integers(2))
    negate = rng.random() < 0.3  # "not good" is negative: the label flips, the adjective does not
    adj = _pick(rng, SENTIMENT[list(SENTIMENT)[1 - y if negate else y]][split])
    noun, neg = _pick(rng, NOUNS[split]), "not " if negate else ""
    form = rng.integers(4)
    text = [f"the {noun} was {neg}{adj}", f"i thought the {noun} was {neg}{adj} overall",
            f"honestly , the {noun} is {neg}{adj}", f"our {noun} was really {neg}{adj}"][form]
    return text, y


def _topic(rng: np.random.Generator, split: int) -> tuple[str, int]:
    y = int(rng.integers(len(TOPIC)))
    words = TOPIC[list(TOPIC)[y]][split]
    other = TOPIC[list(TOPIC)[(y + 1 + rng.integers(len(TOPIC) - 1)) % len(TOPIC)]][split]
    a, b = rng.choice(len(words), size=2, replace=False)
    trio = [words[a], words[b], _pick(rng, other)]  # two on-topic words outvote one distractor
    rng.shuffle(trio)
    return f"{_pick(rng, PEOPLE)} talked about the {trio[0]} , the {trio[1]} and the {trio[2]}", y


def _emotion(rng: np.random.Generator, split: int) -> tuple[str, int]:
    y = int(rng.integers(len(EMOTION)))
    word = _pick(rng, EMOTION[list(EMOTION)[y]][split])
    who, event = _pick(rng, PEOPLE), _pick(rng, EVENTS)
    text = [f"{who} felt {word} when {event}", f"when {event} , {who} was {word}"][rng.integers(2)]
    return text, y


@dataclass(frozen=True)
class SentenceSpec:
    name: str
    classes: list[str]
    make: Callable[[np.random.Generator, int], tuple[str, int]]


SPECS: dict[str, SentenceSpec] = {
    s.name: s
    for s in [
        SentenceSpec("sentiment", list(SENTIMENT), _sentiment),
        SentenceSpec("topic", list(TOPIC), _topic),
        SentenceSpec("emotion", list(EMOTION), _emotion),
    ]
}


def make_split(name: str, split: str, n: int, seed: int = 0) -> Dataset:
    """Generate split 'train', 'test' or 'validation' (each of the last two with its own held-out
    vocabulary) of sentence dataset `name`."""
    if name not in SPECS:
        raise ValueError(f"unknown sentence dataset {name!r}; valid: {', '.join(SPECS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} of sentence dataset {name!r}; valid: {', '.join(SPLITS)}")
    spec = SPECS[name]
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), zlib.crc32(split.encode())])
    texts, ys = zip(*(spec.make(rng, SPLITS[split]) for _ in range(n)), strict=True)
    feats = Features({"text": Value("string"), "label": ClassLabel(names=spec.classes)})
    return Dataset.from_dict({"text": list(texts), "label": list(ys)}, features=feats)
