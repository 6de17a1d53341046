"""runners.record.schema: the typed, versioned results.json record, its JSON Schema, and schema-1 upgrades."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from rbtest import compose_config

from runners.record.results import read_results, write_results
from runners.record.schema import (
    SCHEMA_VERSION,
    Cost,
    Record,
    Run,
    cost_figures,
    json_schema,
    suite_cost,
    upgrade_v1,
)
from runners.train import run

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_schema_loads_neither_torch_nor_omegaconf():
    code = ("import sys, runners.record.schema; "
            "print(sorted(m for m in ('torch', 'omegaconf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_committed_json_schema_is_the_generated_one():
    """Regenerate with `python -m runners.record.schema > runners/record/results.schema.json` after
    changing a dataclass."""
    committed = json.loads((ROOT / "runners" / "record" / "results.schema.json").read_text())
    assert committed == json_schema()
    assert list(committed["$defs"]["Cost"]["properties"]) == [f.name for f in fields(Cost)]
    assert committed["$defs"]["Cost"]["required"] == [] and "lr" in committed["$defs"]["Run"]["required"]


def test_a_record_survives_the_round_trip_and_fills_every_field():
    record = Record(run=Run(method="lora", lr=2e-4, hp={"r": 8}, status="success"))
    record.metrics.per_dataset = {"cars": 0.5}
    d = record.to_dict()
    assert d["schema"] == SCHEMA_VERSION and d["run"]["error"] is None and d["params"]["trainable"] is None
    assert d["cost"] == {}  # nothing measured: no figure at all, not a row of nulls
    assert Record.from_dict(json.loads(json.dumps(d))) == record


def test_cost_keeps_measured_null_apart_from_not_measured():
    """A CPU run has no GPU figures (absent); a run with nothing to train has a step time of null."""
    cost = {"step_time_s": None, "peak_rss_bytes": 123, "train_time_s": 0.0}
    record = Record.from_dict({"schema": 2, "run": {"method": "none"}, "cost": cost})
    assert record.to_dict()["cost"] == cost
    assert cost_figures(record.cost) == {**dict.fromkeys(f.name for f in fields(Cost)), **cost}
    suite = suite_cost([record.cost, Cost(step_time_s=0.5, peak_rss_bytes=7, train_time_s=2.0)]).to_dict()
    assert suite == {"step_time_s": 0.5, "peak_rss_bytes": 123, "train_time_s": 2.0}


def _v1(run: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    return {"schema": 1, "run": {"method": "randlora", "status": "success", "config": config, **run},
            "metrics": {"accuracy": 0.5}}


@pytest.mark.parametrize("config, lr", [
    ({"trainer": {"lr": 5e-3, "method_lr": {"randlora": 1e-3}}}, 1e-3),  # the task's per-method default
    ({"method": {"lr": 2e-4}, "trainer": {"lr": 5e-3, "method_lr": {"randlora": 1e-3}}}, 2e-4),
    ({"trainer": {"lr": 5e-3, "method_lr": {"full": 1e-4}}}, 5e-3),
    ({}, None),
])
def test_schema_1_lr_is_the_lr_that_runner_used(config, lr):
    assert Record.from_dict(_v1({}, config)).run.lr == lr


def test_schema_1_keeps_a_recorded_lr_and_fills_the_rest_explicitly():
    config = {"task": {"data": {"shots": 16}, "model": {"path": "openai/clip-vit-base-patch32"}},
              "trainer": {"lr": 5e-3}}
    run = Record.from_dict(_v1({"lr": 1e-3}, config)).run
    assert (run.lr, run.regime, run.model) == (1e-3, "16shot", "openai/clip-vit-base-patch32")
    assert (run.method_kind, run.method_label) == ("adapter", "RandLoRA")
    assert run.model_revision is None and run.dataset_revisions is None
    full = upgrade_v1({"run": {"method": "full", "config": {"task": {"data": {"fraction": 0.5}}}}})["run"]
    assert (full["method_kind"], full["method_label"], full["regime"]) == ("reference", "Full FT", "frac0.5")


@pytest.mark.parametrize("record, message", [
    ([1, 2], "top level is list, expected an object"),
    ({"schema": 3, "run": {"method": "lora"}}, "unknown results schema 3; this rankbench reads 1 and 2"),
    ({"schema": 2, "params": {}}, "record.run is missing"),
    ({"schema": 2, "run": {"method": "lora", "learning_rate": 1e-3}},
     "record.run.learning_rate is not a field"),
    ({"schema": 2, "run": {"method": "lora", "lr": "fast"}},
     "record.run.lr is str 'fast', expected float or null"),
    ({"schema": 2, "run": {"method": "lora", "status": "done"}},
     "record.run.status is 'done'; valid: 'running'"),
    ({"schema": 2, "run": {"method": "lora"}, "cost": {"peak_rss_bytes": True}},
     "record.cost.peak_rss_bytes is bool"),
    ({"schema": 2, "run": {"method": "lora"}, "metrics": {"per_dataset": {"cars": None}}},
     "record.metrics.per_dataset.cars is NoneType None, expected float"),
])
def test_a_bad_record_is_one_clear_value_error(record, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(".", r"\.")):
        Record.from_dict(record)


# --------------------------------------------- a real run's file against the JSON Schema (the subset we emit)


def _errors(value: Any, schema: dict[str, Any], root: dict[str, Any], where: str = "$") -> list[str]:
    """Violations of the JSON Schema keywords json_schema() emits ($ref, type, properties, required,
    additionalProperties, items, anyOf, enum, const); jsonschema is not a dependency of the project."""
    if "$ref" in schema:
        return _errors(value, root["$defs"][schema["$ref"].rsplit("/", 1)[1]], root, where)
    if "anyOf" in schema:
        ok = any(not _errors(value, s, root, where) for s in schema["anyOf"])
        return [] if ok else [f"{where}: {value!r} matches none of anyOf"]
    if (("const" in schema and value != schema["const"])
            or ("enum" in schema and value not in schema["enum"])):
        return [f"{where}: {value!r} not allowed"]
    kinds = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict,
             "array": list, "null": type(None)}
    if "type" in schema and (not isinstance(value, kinds[schema["type"]])
                             or (isinstance(value, bool) and schema["type"] != "boolean")):
        return [f"{where}: {type(value).__name__} is not {schema['type']}"]
    if isinstance(value, dict):
        return _object_errors(value, schema, root, where)
    if isinstance(value, list) and "items" in schema:
        return [e for i, v in enumerate(value) for e in _errors(v, schema["items"], root, f"{where}[{i}]")]
    return []


def _object_errors(value: dict, schema: dict[str, Any], root: dict[str, Any], where: str) -> list[str]:
    props, extra = schema.get("properties", {}), schema.get("additionalProperties", True)
    errors = [f"{where}: missing {k}" for k in schema.get("required", []) if k not in value]
    for key, v in value.items():
        if key in props:
            errors += _errors(v, props[key], root, f"{where}.{key}")
        elif extra is False:
            errors.append(f"{where}: unexpected {key}")
        elif isinstance(extra, dict):
            errors += _errors(v, extra, root, f"{where}.{key}")
    return errors


def test_the_validator_finds_what_it_should():
    schema = json_schema()
    good = Record(run=Run(method="lora")).to_dict()
    assert _errors(good, schema, schema) == []
    bad = {**good, "run": {**good["run"], "lr": "fast", "extra": 1}, "params": {},
           "cost": {"peak_mem_bytes": 1.5}}
    assert sorted(_errors(bad, schema, schema))[:2] == ["$.cost.peak_mem_bytes: 1.5 matches none of anyOf",
                                                        "$.params: missing adapter_file_bytes"]
    assert "$.run: unexpected extra" in _errors(bad, schema, schema)
    assert "$.run.lr: 'fast' matches none of anyOf" in _errors(bad, schema, schema)


@pytest.mark.slow
def test_a_real_runs_results_json_fits_the_json_schema(tiny_overrides, tmp_path):
    record = run(compose_config(["method=lora", "dataset=shapes", *tiny_overrides]))
    write_and_read = read_results(tmp_path / "run")
    schema = json.loads((ROOT / "runners" / "record" / "results.schema.json").read_text())
    assert _errors(write_and_read, schema, schema) == []
    assert write_and_read == json.loads(json.dumps(record))  # what run() returns is what it wrote
    info = write_and_read["run"]
    assert write_and_read["schema"] == SCHEMA_VERSION and info["method_kind"] == "adapter"
    assert info["method_label"] == "LoRA" and info["model"] == "tiny-clip"
    assert info["model_revision"] is None and info["dataset_revisions"] == {"shapes": None}  # local data


def test_write_results_takes_a_record(tmp_path):
    write_results(tmp_path, Record(run=Run(method="none", status="failed", error="boom")))
    assert Record.from_dict(read_results(tmp_path)).run.error == "boom"


@pytest.mark.slow
def test_hub_revisions_are_the_commits_the_hub_cache_resolves(tmp_path):
    """run.model_revision / run.dataset_revisions: a hub id's commit (here from an offline cache, as
    `from_pretrained` / `load_dataset` resolve it); None for a local folder."""
    for repo, commit in (("models--org--model", "a" * 40), ("datasets--org--data", "b" * 40)):
        (tmp_path / repo / "refs").mkdir(parents=True)
        (tmp_path / repo / "refs" / "main").write_text(commit)
    code = ("import sys; sys.path.insert(0, 'tests'); from rbtest import source; "
            "from tasks.models import hub_revision; from tasks.sources import source_revision; "
            "print(hub_revision('org/model'), source_revision(source(path='org/data')), "
            "source_revision(source(path='tasks')))")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["a" * 40, "b" * 40, "None"]
