"""`python -m analysis.report`: the whole report from a synthetic sweep, and one-line errors on bad input."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from synthetic_results import BUDGETS, make_record, write_record

from analysis.report import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report(sweep_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report"
    assert main([str(sweep_dir), "--out", str(out), "--dpi", "60", "-q"]) == 0
    return out


def test_writes_every_figure_as_png_and_svg(report):
    stems = {p.stem for p in report.glob("*.png")}
    assert {p.stem for p in report.glob("*.svg")} == stems
    clip = {s.split("__")[0] for s in stems if s.endswith("clip-tiny-tiny-clip-16-shot")}
    vision = {s.split("__")[0] for s in stems if "vision" in s}
    assert clip == {"accuracy_vs_params", "memory_pareto", "cost_vs_lora", "per_dataset", "delta_rank"}
    assert vision == clip - {"per_dataset"}  # one dataset: no per-dataset heatmap


def test_summary_md_tables_images_provenance(report, sweep_dir):
    md = (report / "summary.md").read_text()
    for png in report.glob("*.png"):
        assert f"]({png.name})" in md
    assert "| method | budget | trainable params | accuracy (%)" in md
    assert re.search(r"\| RandLoRA \| 73\.7k \| [^|]+ \| \*\*\d+\.\d ± \d\.\d\*\*", md)  # best at budget bold
    per_dataset = md.split("| cars | dtd |")[1].split("\n\n")[0]
    assert re.search(r"\| RandLoRA \| 73\.7k \| \*\*\d", per_dataset)  # best adapter, not full FT
    assert "| Full FT | – | **" not in per_dataset
    assert f"python -m analysis.report {sweep_dir}" in md
    assert "| torch | 2.13.0 |" in md and "0123456789abcdef" in md
    assert "python run.py method=randlora task=clip size=tiny seed=0 budget=18432" in md
    assert "Failed runs (1" in md and "out of memory" in md
    assert "Unreadable result files (1" in md and "nested/results.json" in md


def test_summary_html_is_self_contained(report):
    page = (report / "summary.html").read_text()
    srcs = re.findall(r'src="([^"]+)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert len(srcs) == len(list(report.glob("*.png")))
    assert "<table>" in page and "<b>" in page
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from a server


def test_index_html_is_the_leaderboard_of_every_run_and_figure(report):
    import json

    import pandas as pd

    page = (report / "index.html").read_text()
    data = json.loads(re.search(r'id="leaderboard-data">(.*?)</script>', page, re.DOTALL).group(1))
    assert len(data["rows"]) == len(pd.read_csv(report / "runs.csv"))
    assert sorted(f["src"] for f in data["figures"]) == sorted(p.name for p in report.glob("*.png"))
    assert all(" · " in f["caption"] for f in data["figures"])  # captions name their panel
    assert not re.search(r'(src|href)="(https?:)?//', page)  # no CDN, no network
    assert "`index.html` beside this file is a leaderboard" in (report / "summary.md").read_text()


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_nonexistent_dir(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert "no such file or directory" in _error_line(capsys)


def test_empty_dir(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert "no results.json" in _error_line(capsys)


def test_only_failed_runs(tmp_path, capsys):
    for seed in (0, 1):
        write_record(tmp_path / "runs" / str(seed),
                     make_record("lora", "vision", seed, BUDGETS[0], status="failed"))
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "r"), "-q"]) == 2
    line = _error_line(capsys)
    assert "all 2 runs failed" in line and "out of memory" in line
    assert not (tmp_path / "r").exists()


def test_cli_subprocess_one_line_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "analysis.report", str(tmp_path / "missing")], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("analysis.report: error:")


def test_summary_lists_the_protocol_deviations_runs_recorded(tmp_path):
    record = make_record("lora", "clip", 0, BUDGETS[0])
    record["run"]["protocol"] = {"source": "RandLoRA official code", "deviations": [
        {"what": "q, k and v each get their own adapter", "why": "transformers has no fused in_proj"}]}
    write_record(tmp_path / "runs" / "a", record)
    out = tmp_path / "report"
    assert main([str(tmp_path / "runs"), "--out", str(out), "--dpi", "40", "-q"]) == 0
    md = (out / "summary.md").read_text()
    assert "## Protocol deviations" in md and "protocol of RandLoRA official code" in md
    assert "| q, k and v each get their own adapter | transformers has no fused in_proj |" in md


def test_report_writes_runs_and_paired_csv(report):
    import pandas as pd

    runs = pd.read_csv(report / "runs.csv")
    assert {"run_id", "method", "budget", "seed", "lr", "accuracy", "step_time_s"} <= set(runs.columns)
    assert runs["run_id"].is_unique
    paired = pd.read_csv(report / "paired.csv")
    assert {"method_a", "method_b", "budget", "mean_diff", "ci_low", "ci_high", "n"} <= set(paired.columns)
    assert len(paired) and (paired["ci_low"].isna() | (paired["ci_low"] <= paired["mean_diff"])).all()
    assert "## Paired comparisons" in (report / "summary.md").read_text()


def test_summary_gives_the_binomial_error_of_each_test_set_beside_the_seed_spread(tmp_path):
    for method in ("lora", "loha"):
        for seed in (0, 1):
            record = make_record(method, "vision", seed, BUDGETS[0])
            per = record["metrics"]["per_dataset"]
            record["metrics"]["per_dataset_metrics"] = {d: {"accuracy": a} for d, a in per.items()}
            record["metrics"]["eval_examples"] = dict.fromkeys(per, 400)
            write_record(tmp_path / "runs" / f"{method}{seed}", record)
    out = tmp_path / "report"
    assert main([str(tmp_path / "runs"), "--out", str(out), "--dpi", "40", "-q"]) == 0
    md = (out / "summary.md").read_text()
    row = next(line for line in md.splitlines() if "| 400 |" in line)  # the per-test-set table
    accuracy, se = (float(x) for x in row.split("|")[4:6])
    assert se == pytest.approx(100 * (accuracy / 100 * (1 - accuracy / 100) / 400) ** 0.5, abs=0.01)


def test_tuning_runs_scored_on_validation_are_counted_not_compared(tmp_path, capsys):
    for seed in (0, 1):
        write_record(tmp_path / "runs" / f"final{seed}", make_record("lora", "vision", seed, BUDGETS[0]))
    tuning = make_record("lora", "vision", 0, BUDGETS[1])
    tuning["metrics"]["eval_split"] = "validation"
    write_record(tmp_path / "runs" / "val", tuning)
    out = tmp_path / "report"
    assert main([str(tmp_path / "runs"), "--out", str(out), "--dpi", "40", "-q"]) == 0
    runs = (out / "runs.csv").read_text().splitlines()
    assert len(runs) == 1 + 2 and "validation" not in "".join(runs)
    assert "1 tuning runs of `+sweep=tuned`" in (out / "summary.md").read_text()
    assert main([str(tmp_path / "runs" / "val"), "--out", str(tmp_path / "r2"), "-q"]) == 2
    assert "only the 1 tuning runs" in _error_line(capsys)
