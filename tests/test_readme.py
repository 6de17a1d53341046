"""The README's commands stay correct: every `python run.py` line in its code blocks composes with the real
configs, every `python -m` module exists, and every `make` target it names is in the Makefile."""
from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from rbtest import compose_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
#: run.py arguments that are Hydra flags or launcher choices, not config overrides `compose` can apply.
NOT_OVERRIDES = re.compile(r"^(-m|--cfg|job|hydra/launcher=|hydra\.)")


def _commands() -> list[str]:
    """Commands of the README's fenced code blocks, continuation lines joined and comments dropped."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", README, re.DOTALL)
    text = "\n".join(blocks).replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in text.splitlines() if line.strip()
            and not line.lstrip().startswith("#")]


#: Commands with placeholders (`method=M`, `...`) are templates, not commands.
RUNS = [c for c in _commands() if c.startswith("python run.py") and "..." not in c
        and not re.search(r"=[A-Z]+\b", c)]
MODULES = sorted(set(re.findall(r"python -m ([a-z]\w*(?:\.[a-z]\w*)*)", README)))


def test_the_readme_has_commands_to_check():
    assert len(RUNS) >= 10 and {"runners.preflight", "analysis.report", "runners.export"} <= set(MODULES)


@pytest.mark.parametrize("command", RUNS)
def test_run_commands_compose(command):
    overrides = [a for a in shlex.split(command)[2:] if not NOT_OVERRIDES.match(a)]
    cfg = compose_config(overrides)
    assert cfg.method.name and cfg.task.name


@pytest.mark.parametrize("module", MODULES)
def test_python_m_modules_exist(module):
    assert importlib.util.find_spec(module) is not None, module


def test_make_targets_exist():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    named = set(re.findall(r"`make ([a-z][\w-]*)", README))
    named |= set(re.findall(r"^make ([a-z][\w-]*)", README, re.MULTILINE))
    assert named and named <= targets, named - targets
