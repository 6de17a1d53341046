"""A method analysis has never heard of shows up in every figure and table of the report: methods come from
the results (`run.method_kind`, `run.method_label`), never from a list in analysis."""
from __future__ import annotations

import copy
import csv
from pathlib import Path

import numpy as np
import pytest
from synthetic_results import write_record, write_sweep

from analysis.report import main

LABEL = "NewMethod"
pytestmark = pytest.mark.slow   # a whole report: ~20 s on 2 cores


def new_method_record(record: dict, rng: np.random.Generator) -> dict:
    """A RandLoRA record of the synthetic sweep re-badged as `newmethod`, with its own accuracies."""
    rec = copy.deepcopy(record)
    rec["run"].update(method="newmethod", method_kind="adapter", method_label=LABEL,
                      id=rec["run"]["id"].replace("randlora", "newmethod"))
    rec["run"]["config"]["method"]["name"] = "newmethod"
    per = {d: float(a - 0.02 + rng.normal(0, 0.005)) for d, a in rec["metrics"]["per_dataset"].items()}
    rec["metrics"].update(per_dataset=per, accuracy=float(np.mean(list(per.values()))))
    rec["cost"]["step_time_s"] *= 0.8
    return rec


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import json

    root = tmp_path_factory.mktemp("newmethod")
    sweep = write_sweep(root, tasks=("clip",), failed=False, corrupt=False)
    rng = np.random.default_rng(0)
    randlora = [p for p in sorted(sweep.rglob("results.json")) if '"method": "randlora"' in p.read_text()]
    assert len(randlora) == 9
    for i, path in enumerate(randlora):
        write_record(sweep / "newmethod" / str(i), new_method_record(json.loads(path.read_text()), rng))
    out = root / "report"
    assert main([str(sweep), "--out", str(out), "--dpi", "50", "-q"]) == 0
    return out


def test_new_method_is_in_every_figure(report):
    svgs = sorted(report.glob("*.svg"))
    assert {p.stem.split("__")[0] for p in svgs} >= {"accuracy_vs_params", "memory_pareto", "cost_vs_lora",
                                                       "per_dataset", "delta_rank"}
    missing = [p.name for p in svgs if LABEL not in p.read_text()]   # svg.fonttype none: text stays text
    assert not missing, f"{LABEL} missing from {missing}"


def test_new_method_is_in_every_table(report):
    md = (report / "summary.md").read_text()
    tables = [block for block in md.split("\n\n") if block.startswith("| method |")]
    assert len(tables) >= 2   # summary and per-dataset tables
    assert all(f"| {LABEL} |" in t for t in tables)
    with (report / "runs.csv").open() as f:
        runs = [r for r in csv.DictReader(f) if r["method"] == "newmethod"]
    assert len(runs) == 9
    assert "newmethod" in (report / "paired.csv").read_text()
    assert "newmethod" in (report / "index.html").read_text()
