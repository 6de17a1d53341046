"""Check a whole suite before any GPU time is spent: `python -m runners.preflight <run.py overrides>`.

Prints one line per dataset of the run's suite (source, splits and sizes, class count, first prompt,
problems), the model's target layers and each adapter method's exact count at the checked budgets
(runners/sweeps/launch_check.py reads all of it from metadata, downloading no data), the memory plan and
the config's facts no public source confirms. Every problem is listed at once; the exit status is 1 if
there is any. `preflight.budgets=[lora4,...]` picks the budgets; `preflight.out=PATH` also writes the
records as JSON (a list, one record per dataset: dataset, source, splits, columns, num_classes, classes,
prompts, problems, model).
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig

from runners.engine.config import compose_config
from runners.sweeps.launch_check import check_suite, first_line, model_table, problems, table


def unchecked_facts(cfg: DictConfig) -> list[str]:
    """The config's facts no public source could confirm (`task.protocol.notes`), as one block of the
    report, so a launch never rests on them unawares; empty when there are none."""
    notes = [str(n) for n in (cfg.task.get("protocol") or {}).get("notes") or []]
    if not notes:
        return []
    return ["not checked against a public source (task.protocol.notes):\n  " + "\n  ".join(notes)]


def memory_plan(cfg: DictConfig) -> tuple[str, list[str]]:
    """(the run's memory plan in one line, [the problem] when it cannot fit the card), from
    runners/engine/memplan.py."""
    from runners.engine import memplan

    try:
        return memplan.summary(cfg)
    except Exception as err:
        return f"memory plan: unavailable ({type(err).__name__}: {first_line(err)})", []


def main(argv: list[str]) -> int:
    out = next((a.split("=", 1)[1] for a in argv if a.startswith("preflight.out=")), None)
    budgets = next((a.split("=", 1)[1].strip("[]").split(",") for a in argv
                    if a.startswith("preflight.budgets=")), None)
    cfg = compose_config([a for a in argv if not a.startswith("preflight.")])
    try:
        records = check_suite(cfg, budgets)
    except (ValueError, KeyError, TypeError, FileNotFoundError, RuntimeError) as err:
        # nothing to list per dataset
        raise SystemExit(f"rankbench: preflight could not start: {first_line(err)}") from err
    plan, over = memory_plan(cfg)
    found = problems(records) + over
    report = [table(records), model_table(records[0].model) if records else "no datasets", plan,
              *unchecked_facts(cfg),
              f"{len(found)} problem(s)" + (":\n  " + "\n  ".join(found) if found else ": ready to launch")]
    sys.stdout.write("\n".join(report) + "\n")  # the report is this command's output, not a log
    if out:
        Path(out).write_text(json.dumps([asdict(r) for r in records], indent=1, default=str))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
