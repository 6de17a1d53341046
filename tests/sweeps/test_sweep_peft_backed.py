"""A sweep with two PEFT-backed methods writes records the report shows everywhere (figures, tables,
runs.csv, paired.csv, the leaderboard), beside our LoRA; a knob-less method's budgets get one line each."""
from __future__ import annotations

import csv

import pytest
from sweephelpers import TINY, assert_on_budget, results, run_py

from analysis.report import main as report

pytestmark = pytest.mark.slow   # 9 tiny runs and a report: ~3 min on 2 shared cores

SWEEP = ["+sweep=budget", "task=clip", "sweep.methods=[lora,dora,fourierft,ia3]",
         "sweep.budgets=[lora4,lora8]",
         "sweep.seeds=[0]", "sweep.references=[]"]
LABELS = {"lora": "LoRA", "dora": "DoRA", "fourierft": "FourierFT"}


def test_peft_backed_methods_reach_every_figure_table_and_the_leaderboard(tmp_path):
    proc = run_py(["-m", *SWEEP, *TINY, f"sweep.root={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "not launching ia3 at budget lora4: ia3 has no size knob" in proc.stdout
    sweep_dir = tmp_path / "budget" / "clip-tiny"
    records = results(sweep_dir)
    assert set(records) == {f"shapes/{m}-{b}-s0" for m in LABELS for b in ("lora4", "lora8")}
    for record in records.values():
        assert record["run"]["status"] == "success", record["run"]["error"]
        assert_on_budget(record)
    assert records["shapes/dora-lora8-s0"]["run"]["method_label"] == "DoRA"

    out = tmp_path / "report"
    assert report([str(sweep_dir), "--out", str(out), "--dpi", "50", "-q"]) == 0
    svgs = sorted(out.glob("*.svg"))
    for label in LABELS.values():
        missing = [p.name for p in svgs if label not in p.read_text()]
        assert not missing, f"{label} missing from {missing}"
    tables = [b for b in (out / "summary.md").read_text().split("\n\n") if b.startswith("| method |")]
    assert tables and all(f"| {label} |" in t for t in tables for label in LABELS.values())
    with (out / "runs.csv").open() as f:
        assert sorted({r["method"] for r in csv.DictReader(f)}) == sorted(LABELS)
    assert all(m in (out / "index.html").read_text() for m in ("dora", "fourierft"))
    assert "dora" in (out / "paired.csv").read_text()
