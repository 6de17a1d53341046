"""Task defaults live in the YAML a user reads: every key a task reads is declared there, none defaulted in
code, and every dataset source gets the declared source defaults (conf/task/sources/defaults.yaml)."""
from __future__ import annotations

import ast

import pytest
import yaml
from omegaconf import OmegaConf
from rbtest import ROOT, compose_config, source

import tasks
from tasks.sources import source_config

SIZES = {"clip": ["tiny", "base", "large"], "vision": ["tiny", "base", "large"],
         "language": ["tiny", "base", "large"], "commonsense": ["base", "large"]}
NOT_READ_AS_KEYS = ("processor", "protocol", "conventions")  # passed whole to a library, or copied to results
SOURCE_DEFAULTS = yaml.safe_load((ROOT / "conf/task/sources/defaults.yaml").read_text())


def _keys(node: object, skip: tuple[str, ...] = NOT_READ_AS_KEYS) -> set[str]:
    if not isinstance(node, dict):
        return set()
    return {k for k in node} | {n for k, v in node.items() if k not in skip for n in _keys(v, skip)}


def _declared() -> set[str]:
    """Every key name of the composed task configs and of the source defaults."""
    names = set(SOURCE_DEFAULTS)
    for task, sizes in SIZES.items():
        for size in sizes:
            task_node = compose_config([f"task={task}", f"size={size}"]).task
            names |= _keys(OmegaConf.to_container(task_node))
    return names


def _literal_gets(source: str) -> list[tuple[int, str]]:
    """(line, key) of every `<anything>.get("<key>", ...)` call."""
    return [(node.lineno, node.args[0].value) for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)]


def test_no_declared_task_key_is_read_with_a_default_in_code() -> None:
    """`.get("<declared key>", ...)` in tasks/ would be a second default, hidden from the YAML's reader."""
    declared = _declared()
    found = [f"tasks/{path.name}:{line} .get({key!r})" for path in sorted((ROOT / "tasks").glob("*.py"))
             for line, key in _literal_gets(path.read_text()) if key in declared]
    assert found == []


@pytest.mark.parametrize("task", ["clip", "vision", "language", "commonsense"])
def test_every_configured_source_gets_every_declared_key(task: str) -> None:
    data = compose_config([f"task={task}", "size=base"]).task.data
    for name in data.sources:
        assert set(source_config(data, name)) == set(SOURCE_DEFAULTS), name


def test_a_misspelt_source_key_is_one_clear_error_before_any_data_is_read() -> None:
    cfg = compose_config(["task=vision", "dataset=shapes",
                          "+task.data.sources.shapes={path: /nonexistent, label_ofset: -1}"])
    with pytest.raises(ValueError) as err:
        _ = tasks.build(cfg.task).suite
    message = str(err.value)
    assert "task.data.sources.shapes sets label_ofset" in message and "label_offset" in message
    assert len(message.splitlines()) == 1


def test_a_test_built_source_gets_the_defaults_a_run_gives_it() -> None:
    """tests/rbtest.source and a run's source_config: one merge, one defaults file."""
    cfg = compose_config(["task=clip", "+task.data.sources.shapes={path: /x, label_offset: -1}"])
    assert source_config(cfg.task.data, "shapes") == source(path="/x", label_offset=-1)
    assert source_config(cfg.task.data, "colors") is None  # generated: no source
