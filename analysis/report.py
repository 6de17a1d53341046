"""`python -m analysis.report DIR [DIR...] --out report/`: figures, summary.md and index.html.

The CLI is thin: load -> one section per comparison panel (task, model, size, data regime) with its
tables and figures -> provenance (the command, git commits and package versions behind every input).
Bad input ends with one clear line on stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from analysis import plots
from analysis.aggregate import (
    SETTING_KEYS,
    aggregate_seeds,
    best_adapter_mask,
    is_adapter,
    memory_column,
    method_order,
    normalise_to_lora,
    panels,
    per_dataset_table,
    per_run,
    successful,
)
from analysis.document import Block, Cell, Table, to_html, to_markdown
from analysis.leaderboard import write_leaderboard
from analysis.load import COST_COLUMNS, PANEL_KEYS, ResultsError, load_results
from analysis.paired import noise_floor, paired_differences, per_test_set_noise, win_tie_loss
from analysis.published import comparison, load_tables, relevant

log = logging.getLogger("analysis.report")

#: (file stem, figure function, caption). Order is the order in the report.
FIGURES: list[tuple[str, Callable[[pd.DataFrame], Figure], str]] = [
    ("accuracy_vs_params", plots.fig_accuracy_vs_params,
     ("Accuracy vs trainable parameters (log scale), one line per method; dashed/dotted lines: full "
     "fine-tuning and head-only/zero-shot references; error bars and bands: 95% Student-t intervals over "
     "seeds (the seed count n in the legend); a bar wider than the axis is cut at it and ends in an "
     "arrowhead.")),
    ("memory_pareto", plots.fig_memory_pareto,
     ("Peak memory vs accuracy for every method and budget; circled points and the dashed step line form "
     "the Pareto front (less memory, more accuracy).")),
    ("cost_vs_lora", plots.fig_cost_vs_lora,
     ("Step time and peak memory relative to LoRA at the same parameter budget (1.0 = LoRA); 95% CI over "
      "seeds.")),
    ("per_dataset", plots.fig_per_dataset,
     "Per-dataset accuracy (%), seed means; best adapter per column in bold; shading is per column."),
    ("delta_rank", plots.fig_delta_rank,
     ("Rank of the learned update dW as a fraction of the layer's maximum rank (mean over sampled layers); "
      "error bars: 95% Student-t intervals over seeds, cut at the axis like the accuracy figure's.")),
    ("forgetting", plots.fig_forgetting,
     ("Accuracy gained by training against forgetting (CLIP: zero-shot accuracy lost on the suite's other "
      "datasets; language: loss increase on held-out generic text), one point per method and budget; error "
      "bars: 95% CI over seeds. Up and left is better.")),
]


class ReportError(RuntimeError):
    """Input that cannot produce a report; the message is the one line the user sees."""


# ------------------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (0 ok, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(name)s: %(levelname)s: %(message)s")
    command = "python -m analysis.report " + shlex.join(argv)
    try:
        df = load_results(args.dirs)
        index = build_report(df, Path(args.out), command=command, dpi=args.dpi)
    except (ResultsError, ReportError, OSError) as exc:
        print(f"analysis.report: error: {exc}", file=sys.stderr)
        return 2
    log.info("wrote %s", index)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", help="sweep output directories (searched recursively for results.json)")
    p.add_argument("--out", default="report", help="output directory (default: report/)")
    p.add_argument("--dpi", type=int, default=200, help="PNG resolution (default: 200)")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return p


# --------------------------------------------------------------------------------------- report


def build_report(df: pd.DataFrame, out: Path, command: str = "", dpi: int = 200,
                 paper_tables: list[dict] | None = None) -> Path:
    """Write figures (PNG+SVG), summary.md/.html, the CSVs and the index.html leaderboard; returns its path.
    `paper_tables`: the published numbers to print beside ours (None: analysis/paper/*.yaml)."""
    df, tuning = split_tuning_runs(df)
    if df.empty:
        raise ReportError(f"only the {tuning} tuning runs of a +sweep=tuned (scored on validation) were "
                          "found; the report compares its final runs, scored on test")
    ok = successful(df)
    if ok.empty:
        n = df["source"].nunique()
        raise ReportError(f"all {n} runs failed; nothing to compare (first error: {_first_error(df)})")
    out.mkdir(parents=True, exist_ok=True)
    blocks = _header(df, command)
    if tuning:
        blocks.append(Block("p", f"{tuning} tuning runs of `+sweep=tuned` (scored on the validation split "
                                 "to choose each method's lr) are left out of every table and figure; each "
                                 "final run lists its candidates and their validation scores in "
                                 "`run.tuning`."))
    for key, part in panels(df):
        blocks += _panel_section(key, part, out, dpi)
    paired = paired_differences(df)
    paired.to_csv(out / "paired.csv", index=False)
    runs_table(df).to_csv(out / "runs.csv", index=False)
    blocks += _paper_section(df, load_tables() if paper_tables is None else paper_tables)
    blocks += _paired_section(df, paired)
    blocks += _failures_section(df) + _protocol_section(df) + _provenance_section(df, command)
    (out / "summary.md").write_text(to_markdown(blocks))
    (out / "summary.html").write_text(to_html(blocks, "rankbench report", out))
    captions = _figure_captions(blocks)
    return write_leaderboard(leaderboard_runs(df), out, [out / name for name in captions], captions)


def split_tuning_runs(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """(runs scored on test, how many runs were scored on validation): validation scores choose
    hyper-parameters (+sweep=tuned) and are never reported beside test scores."""
    if "eval_split" not in df.columns:
        return df, 0
    tuning = df["eval_split"] == "validation"
    return df[~tuning], int(df.loc[tuning, "source"].nunique())


def _figure_captions(blocks: list[Block]) -> dict[str, str]:
    """Image file -> "panel: first sentence of its caption", in report order, for the leaderboard page."""
    captions, panel = {}, ""
    for b in blocks:
        panel = b.text if b.kind == "h2" else panel
        if b.kind == "image":
            captions[b.path] = f"{panel}: {re.split(r'[.;] ', b.text)[0]}"
    return captions


def _header(df: pd.DataFrame, command: str) -> list[Block]:
    runs = per_run(df)
    n_failed = int((runs["status"] != "success").sum())
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        Block("h1", "rankbench comparison report"),
        Block("p", f"Generated {stamp} by `{command}` from {len(runs)} runs ({n_failed} failed, "
                   f"{len(df.attrs.get('skipped', []))} unreadable result files skipped). Accuracy is "
                   "top-1 on the evaluation split, mean over seeds ± 95% CI (Student t); failed runs are "
                   "never averaged in."),
        Block("p", "`index.html` beside this file is a leaderboard of every configuration that opens "
                   "from disk: sort and filter the table, plot any two metrics with their Pareto front, "
                   "export CSV. `summary.html` is this report as one page."),
    ]


def _panel_section(key: tuple, part: pd.DataFrame, out: Path, dpi: int) -> list[Block]:
    blocks = [Block("h2", plots.panel_label(*key)), _summary_table(part)]
    multi = successful(part)["dataset"].nunique() > 1
    for stem, fn, caption in FIGURES:
        if stem == "per_dataset" and not multi:
            continue
        name, problem = _save_figure(fn, part, out, f"{stem}__{_slug(key)}", dpi)
        if name:
            blocks.append(Block("image", caption, path=name))
        else:
            blocks.append(Block("p", f"(Figure `{stem}` not drawn: {problem}.)"))
        if stem == "per_dataset" and multi:
            blocks.append(_per_dataset_block(part))
    return blocks


def _save_figure(fn: Callable[[pd.DataFrame], Figure], part: pd.DataFrame, out: Path, stem: str,
                 dpi: int) -> tuple[str | None, str]:
    """Render one figure to PNG and SVG -> (png name, ""); data it needs are absent -> (None, why)."""
    try:
        fig = fn(part)
    except ValueError as exc:
        log.info("skipping figure %s: %s", stem, exc)
        return None, str(exc)
    fig.savefig(out / f"{stem}.png", dpi=dpi)
    fig.savefig(out / f"{stem}.svg")
    return f"{stem}.png", ""


# --------------------------------------------------------------------------------------- tables


def summary_frame(part: pd.DataFrame) -> pd.DataFrame:
    """Per (method, budget): params, accuracy, gain over before-training, cost and cost ratio to LoRA."""
    mem = memory_column(part)
    costs = [c for c in ("step_time_s", *_counted(part), mem) if c]
    runs = normalise_to_lora(per_run(part), costs)
    metrics = ["trainable_params", "mean_accuracy", "mean_accuracy_before", *costs,
               *(f"{c}_rel" for c in costs)]
    return aggregate_seeds(runs, metrics, keys=SETTING_KEYS)


def _counted(part: pd.DataFrame) -> list[str]:
    """The device-independent cost columns (FLOPs and operators per step) that some run recorded."""
    return [c for c in COUNT_COLUMNS if c in part and part[c].notna().any()]


#: cost figures a GPU cannot change (runners.engine.measure.StepCounts), shown as ratios to LoRA beside
#: step time
COUNT_COLUMNS = {"flops_per_step": "FLOPs ×LoRA", "ops_per_step": "ops ×LoRA"}


def _summary_table(part: pd.DataFrame) -> Block:
    agg = summary_frame(part)
    mem = memory_column(part)
    counted = _counted(part)
    best = _best_per_budget(agg)
    headers = ["method", "budget", "trainable params", "accuracy (%)", "gain (pp)", "seeds", "step time (ms)",
               "step time ×LoRA", *(COUNT_COLUMNS[c] for c in counted)]
    if mem:
        headers += [f"{'GPU peak' if mem == 'peak_mem_bytes' else 'CPU peak RSS'} (MiB)", "memory ×LoRA"]
    rows = []
    for i, r in agg.iterrows():
        gain = 100 * (r["mean_accuracy_mean"] - r["mean_accuracy_before_mean"])
        row = [Cell(r["method_label"]), Cell(_budget_text(r["budget_target"])),
               Cell(plots.human(r["trainable_params_mean"])),
               Cell(_pm(100 * r["mean_accuracy_mean"], 100 * r["mean_accuracy_ci95"]), bold=i in best),
               Cell(_num(gain, "+.1f")), Cell(str(int(r["n_runs"]))),
               Cell(_num(1000 * r["step_time_s_mean"], ".1f")),
               Cell(_num(r.get("step_time_s_rel_mean"), ".2f")),
               *(Cell(_num(r.get(f"{c}_rel_mean"), ".2f")) for c in counted)]
        if mem:
            row += [Cell(_num(r[f"{mem}_mean"] / 2**20, ".0f")), Cell(_num(r.get(f"{mem}_rel_mean"), ".2f"))]
        rows.append(row)
    caption = ("accuracy: mean ± 95% CI over seeds (bold: best adapter at each budget); gain: accuracy minus "
               "accuracy before training, percentage points; ×LoRA: ratio to LoRA at the same budget"
               + ("; FLOPs and ops: torch's FLOP count and the aten operators dispatched in one optimizer "
                  "step, the same on every device." if counted else "."))
    return Block("table", table=Table(headers, rows, caption))


def _best_per_budget(agg: pd.DataFrame) -> set[int]:
    adapters = agg[is_adapter(agg) & agg["budget_target"].notna()]
    if adapters.empty:
        return set()
    return set(adapters.groupby("budget_target")["mean_accuracy_mean"].idxmax().dropna().astype(int))


def _per_dataset_block(part: pd.DataFrame) -> Block:
    table = per_dataset_table(part)
    values, bold = table.to_numpy(dtype=float), best_adapter_mask(table)
    rows = [[Cell(plots.label(part, m)), Cell(_budget_text(b))]
            + [Cell(_num(100 * v, ".1f"), bold=bool(bold[i, j])) for j, v in enumerate(values[i])]
            for i, (m, b) in enumerate(table.index)]
    caption = "Per-dataset accuracy (%), seed means; best adapter per column in bold (references excluded)."
    return Block("table", table=Table(["method", "budget", *map(str, table.columns)], rows, caption))


#: report/runs.csv: frame column -> CSV name, in CSV order; every figure as the run's results.json has it
#: (read through runners.record.schema by analysis.load, nothing recomputed), costs all of
#: runners.record.schema.Cost.
RUN_COLUMNS = {
    "run_id": "run_id", "method": "method", "method_kind": "method_kind", "method_label": "method_label",
    "task": "task", "size": "size", "model": "model", "regime": "regime", "run_dataset": "run_dataset",
    "budget_target": "budget", "seed": "seed", "lr": "lr", "status": "status", "mean_accuracy": "accuracy",
    "mean_accuracy_before": "accuracy_before", "eval_split": "eval_split", "trainable_params": "trainable",
    "head_trainable_params": "head_trainable", "total_params": "total", "budget_error": "budget_error",
    "budget_reached": "budget_reached", "adapter_file_bytes": "adapter_file_bytes", "device": "device",
    "device_type": "device_type", **{c: c for c in COST_COLUMNS}, "model_revision": "model_revision",
    "dataset_revisions": "dataset_revisions",
    "source": "source",
}


def runs_table(df: pd.DataFrame) -> pd.DataFrame:
    """report/runs.csv: one row per run (a suite's datasets combined), its own lr (`run.lr`, as used),
    its accuracy and every cost figure of its record."""
    return per_run(df)[list(RUN_COLUMNS)].rename(columns=RUN_COLUMNS)


def leaderboard_runs(df: pd.DataFrame) -> pd.DataFrame:
    """runs.csv with a `dataset` column for the leaderboard's select: the run's dataset, or "mean of N
    datasets" for a suite run (its accuracy is the suite mean)."""
    runs = runs_table(df)
    if "dataset" in runs.columns or "run_id" not in runs.columns:
        return runs
    names = df.groupby("run_id", sort=False)["dataset"].agg(_dataset_label)
    at = runs.columns.get_loc("run_dataset") if "run_dataset" in runs.columns else len(runs.columns)
    runs = runs.drop(columns=["run_dataset"], errors="ignore")
    runs.insert(at, "dataset", runs["run_id"].map(names))
    return runs


def _dataset_label(datasets: pd.Series) -> str:
    names = list(dict.fromkeys(map(str, datasets.dropna())))
    return names[0] if len(names) == 1 else f"mean of {len(names)} datasets"


def _paired_section(df: pd.DataFrame, paired: pd.DataFrame) -> list[Block]:
    """Win/tie/loss of each method pair over budgets (suite means, 95% paired intervals) and the noise
    floor."""
    wtl = win_tie_loss(paired)
    if wtl.empty:
        return []
    rows = [[Cell(r["method_a"]), Cell(r["method_b"]), Cell(str(r["win"])), Cell(str(r["tie"])),
             Cell(str(r["loss"]))] for _, r in wtl.iterrows()]
    return [Block("h2", "Paired comparisons"),
            Block("p", "Mean of per-seed accuracy differences (a - b) at each budget with a 95% Student-t "
                       "interval (report/paired.csv, also per dataset); a win is an interval above 0, a tie "
                       "one containing 0 (or fewer than two seeds), counted over budgets and panels."),
            Block("table", table=Table(["method a", "method b", "wins of a", "ties", "losses of a"], rows)),
            *_noise_blocks(df)]


def _noise_blocks(df: pd.DataFrame) -> list[Block]:
    """The noise floor: seed-to-seed spread and the binomial error of finite test sets, per panel and per
    test set (blank where the runs did not record their test-set sizes)."""
    floor = noise_floor(df)
    floor_rows = [[Cell(_panel_label(r)), Cell(_num(100 * r["seed_std_median"], ".2f")),
                   Cell(_num(100 * r["seed_std_max"], ".2f")),
                   Cell(_num(100 * r["binomial_se_median"], ".2f")),
                   Cell(str(r["configurations"]))] for _, r in floor.iterrows()]
    sets = per_test_set_noise(df)
    set_rows = [[Cell(_panel_label(r)), Cell(r["dataset"]), Cell(_int(r["eval_examples"])),
                 Cell(_num(100 * r["accuracy_median"], ".1f")), Cell(_num(100 * r["binomial_se"], ".2f")),
                 Cell(_num(100 * r["seed_std_median"], ".2f"))] for _, r in sets.iterrows()]
    blocks = [Block("h3", "Noise floor"),
              Block("table", table=Table(["panel", "seed std, median (points)", "seed std, max (points)",
                                          "binomial SE of a suite mean, median (points)", "configurations"],
                                         floor_rows))]
    if set_rows:
        blocks += [Block("p", "Per test set: the binomial standard error sqrt(p(1-p)/n) of one run's "
                              "accuracy at the median accuracy p of adapter runs, beside the seed-to-seed "
                              "spread."),
                   Block("table", table=Table(["panel", "dataset", "test examples", "accuracy, median (%)",
                                               "binomial SE (points)", "seed std, median (points)"],
                                              set_rows))]
    return blocks


def _panel_label(row: pd.Series) -> str:
    return plots.panel_label(*(row[k] for k in PANEL_KEYS))


def _failures_section(df: pd.DataFrame) -> list[Block]:
    blocks: list[Block] = []
    failed = per_run(df)
    failed = failed[failed["status"] != "success"]
    if len(failed):
        rows = [[Cell(r["method"]), Cell(r["task"]), Cell(_budget_text(r["budget_target"])),
                 Cell(_int(r["seed"])), Cell(str(r["error"] or "")), Cell(str(r["source"]))]
                for _, r in failed.iterrows()]
        blocks += [Block("h2", f"Failed runs ({len(failed)}, excluded from every mean)"),
                   Block("table", table=Table(["method", "task", "budget", "seed", "error", "file"], rows))]
    skipped = df.attrs.get("skipped", [])
    if skipped:
        rows = [[Cell(s["file"]), Cell(s["reason"])] for s in skipped]
        blocks += [Block("h2", f"Unreadable result files ({len(skipped)}, skipped)"),
                   Block("table", table=Table(["file", "reason"], rows))]
    return blocks


def _paper_section(df: pd.DataFrame, tables: list[dict]) -> list[Block]:
    """The paper's published numbers beside ours for every table whose task, size and regime the runs have
    (analysis/published.py): per dataset and the mean, with ours minus the paper's in points."""
    blocks: list[Block] = []
    for table in relevant(successful(df), tables):
        frame = comparison(df, table)
        cols = [*table["datasets"], "mean"]
        rows = [[Cell(r["row"]), Cell(r["side"])] + [Cell(_paper_cell(r[c], r["side"])) for c in cols]
                for _, r in frame.iterrows()]
        missing = [r["label"] for r in table["rows"] if not r.get("values")]
        note = (f" Not transcribed yet (n/a): {', '.join(missing)} (analysis/paper/{table['file']})."
                if missing else "")
        caption = (f"{table['source']}. Ours: seed means of the runs with the same method and r (percent). "
                   "mean: the paper's as published where given, else (and for ours and the difference) over "
                   f"the datasets both sides have.{note}")
        blocks += [Block("h3", f"{table['name']} ({table['task']}, {table['size']}, {table['regime']})"),
                   Block("table", table=Table(["row", "", *cols], rows, caption))]
    return [Block("h2", "Beside the paper's published numbers"), *blocks] if blocks else []


def _paper_cell(value: object, side: str) -> str:
    """A value of the paper comparison: "n/a" where absent, differences signed."""
    return _num(value, "+.1f" if side == "ours - paper" else ".1f") or "n/a"


def _protocol_section(df: pd.DataFrame) -> list[Block]:
    """Each task's paper protocol and the deviations its runs recorded (`run.protocol`), so no figure
    is read as the paper's setting where it is not."""
    runs = per_run(df)
    blocks: list[Block] = []
    for (task, size), part in runs.groupby(["task", "size"], sort=True):
        for text in sorted(set(part["protocol"].dropna())):
            protocol = json.loads(text)
            if not protocol.get("source") and not protocol.get("deviations"):
                continue
            rows = [[Cell(str(d.get("what", ""))), Cell(str(d.get("why", "")))]
                    for d in protocol.get("deviations", [])]
            source = protocol.get("source") or "unnamed source"
            blocks += [Block("h3", f"{task} ({size}): protocol of {source}"),
                       Block("table", table=Table(["deviation", "why"], rows)) if rows else
                       Block("p", "No deviations recorded.")]
    return [Block("h2", "Protocol deviations"), *blocks] if blocks else []


def _provenance_section(df: pd.DataFrame, command: str) -> list[Block]:
    runs = per_run(df)
    commits = runs.groupby(runs["git_commit"].fillna("unknown"))["source"].count()
    dirty = runs.groupby(runs["git_commit"].fillna("unknown"))["git_dirty"].agg(
        lambda s: bool(s.fillna(False).any()))
    commit_rows = [[Cell(c), Cell("yes" if dirty[c] else "no"), Cell(str(n))] for c, n in commits.items()]
    ordered = (runs.assign(_m=runs["method"].map(method_order(runs).index))
               .sort_values(["task", "_m", "budget_target", "seed"]))
    listing = [f"{r['command']}    # {r['source']}" for _, r in ordered.iterrows()]
    return [
        Block("h2", "Provenance"),
        Block("p", "Report command:"), Block("code", command),
        Block("h3", "Code"),
        Block("table", table=Table(["git commit", "uncommitted changes", "runs"], commit_rows)),
        Block("h3", "Package versions"), Block("table", table=_versions_table(runs)),
        Block("h3", "Devices"),
        Block("table", table=Table(["device", "runs"], [[Cell(str(d)), Cell(str(n))] for d, n in
                                                          runs["device"].fillna("unknown").value_counts().items()])),
        Block("p", "Run commands come from the result file when the runner recorded one, otherwise they are "
                   "rebuilt from the run's method, task, size, seed, budget and dataset."),
        Block("details", f"Command of each of the {len(runs)} runs", extra=listing),
    ]


def _versions_table(runs: pd.DataFrame) -> Table:
    """Every package with the versions seen across runs; more than one version is a red flag."""
    seen: dict[str, dict[str, int]] = {}
    for text in runs["versions"].dropna():
        for pkg, ver in json.loads(text).items():
            seen.setdefault(pkg, {}).setdefault(str(ver), 0)
            seen[pkg][str(ver)] += 1
    rows = [[Cell(pkg), Cell(", ".join(f"{v} ({n} runs)" if len(vs) > 1 else v for v, n in vs.items()),
                             bold=len(vs) > 1)] for pkg, vs in sorted(seen.items())]
    return Table(["package", "version"], rows, "bold: runs disagree on this package's version" if any(
        r[1].bold for r in rows) else "")


# -------------------------------------------------------------------------------------- helpers


def _first_error(df: pd.DataFrame) -> str:
    errors = df["error"].dropna()
    return str(errors.iloc[0]) if len(errors) else "none recorded"


def _slug(key: tuple) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", "_".join(map(str, key))).strip("-").lower()


def _budget_text(budget: object) -> str:
    return "–" if budget is None or pd.isna(budget) else plots.human(float(budget))


def _num(x: object, fmt: str) -> str:
    return "" if x is None or pd.isna(x) else format(float(x), fmt)


def _pm(mean: float, ci: float) -> str:
    return _num(mean, ".1f") + ("" if pd.isna(ci) else f" ± {ci:.1f}")


def _int(x: object) -> str:
    return "" if x is None or pd.isna(x) else str(int(x))


if __name__ == "__main__":
    sys.exit(main())
