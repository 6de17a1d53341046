"""Fixtures for the task tests: real composed configs, shrunk data, one model load per task."""
from __future__ import annotations

import pytest
import torch
from taskhelpers import SMALL, TASKS, compose_task

import tasks


@pytest.fixture(autouse=True, scope="session")
def _threads() -> None:
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared 2-core machine


@pytest.fixture(scope="module", params=TASKS)
def built(request: pytest.FixtureRequest) -> tuple[tasks.Task, torch.nn.Module]:
    """(task, model) per task kind on shrunk data, loaded once per module."""
    task = tasks.build(compose_task(request.param, *SMALL).task)
    return task, task.build_model()
