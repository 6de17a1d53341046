"""Tasks: backbone + data + loss + evaluation, one module per modality, looked up by `task.kind`."""
from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig

from tasks.base import Batch, Task

_REGISTRY: dict[str, type[Task]] = {}


def register(kind: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: make a Task subclass available as `task.kind: <kind>` in config."""

    def deco(cls: type[Task]) -> type[Task]:
        _REGISTRY[kind] = cls
        return cls

    return deco


def available() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def build(cfg: DictConfig) -> Task:
    """Build the task described by the `task` config node (its `kind` selects the class)."""
    _import_all()
    kind = cfg.kind
    if kind not in _REGISTRY:
        raise ValueError(f"unknown task kind {kind!r}; valid kinds: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[kind](cfg)


def _import_all() -> None:
    # Task modules register themselves on import; importing here keeps `tasks.build` self-contained.
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        if mod.name not in ("base",) and not mod.name.startswith("_"):
            importlib.import_module(f"tasks.{mod.name}")


__all__ = ["Batch", "Task", "available", "build", "register"]
