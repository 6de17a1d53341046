"""The memory plan of a task's jobs as a table: `python -m runners.plan <run.py overrides>`.

    python -m runners.plan task=commonsense size=large plan.gpu_memory_gb=80
    python -m runners.plan task=clip size=large plan.budgets=[lora16,lora32] plan.methods=[lora,full]

One row per method x budget (references once): predicted frozen weights, state, activations and peak per
GPU (runners/engine/memplan.py), whether it fits the card with the allowance, and the GPUs FSDP would need.
`plan.gpus=N` plans N data-parallel processes per job (`trainer.strategy` says which kind).
"""
from __future__ import annotations

import logging
import sys

from runners.engine import memplan

log = logging.getLogger("rankbench.plan")

BUDGETS = ["lora16", "lora32"]
OWN_KEYS = ("plan.budgets=", "plan.methods=", "plan.gpus=")


def jobs(methods: list[str], budgets: list[str]) -> list[tuple[str, str | None]]:
    """(method, budget) rows: every adapter at every budget, each reference once."""
    from runners.engine.adapt import REFERENCES

    return [(m, None) if m in REFERENCES else (m, b)
            for m in methods for b in ([None] if m in REFERENCES else budgets)]


def rows(overrides: list[str], methods: list[str], budgets: list[str], gpus: int, notes: list[str]
         ) -> list[list[str]]:
    """The table's rows (a header first); jobs that cannot be planned get dashes and a line in `notes`."""
    from runners.engine.config import compose_config

    head = ["job", "weights", "state", "activations", "peak/GPU", "fits", "FSDP GPUs"]
    out = [head]
    for method, budget in jobs(methods, budgets):
        cfg = compose_config([*overrides, f"method={method}", f"budget={budget or 'null'}"])
        card = memplan.card_bytes(cfg.plan)
        allowance = int(float(cfg.plan.allowance_gb) * memplan.GiB)
        try:
            plan, peak = memplan.job_plan(cfg, gpus)
        except ValueError as err:  # a budget this structure cannot reach: the sweep skips it too
            out.append([f"{method}@{budget}", "-", "-", "-", "-", "-", "-"])
            notes.append(f"{method}@{budget} not planned: {str(err).splitlines()[0]}")
            continue
        fits = "?" if card is None else "yes" if peak + allowance <= card else "NO"
        need = "-" if card is None or fits == "yes" else str(plan.fsdp_gpus(card, allowance) or ">64")
        out.append([f"{method}" + (f"@{budget}" if budget else ""), memplan.gb(plan.weights),
                    memplan.gb(plan.state), memplan.gb(plan.activations), memplan.gb(peak), fits, need])
    return out


def _value(argv: list[str], key: str) -> str | None:
    return next((a.split("=", 1)[1] for a in argv if a.startswith(key)), None)


def _listed(text: str | None) -> list[str] | None:
    return None if text is None else [x.strip() for x in text.strip("[]").split(",") if x.strip()]


def main(argv: list[str]) -> int:
    from runners.engine.adapt import method_names

    overrides = [a for a in argv if not a.startswith(OWN_KEYS)]
    methods = _listed(_value(argv, "plan.methods=")) or method_names()
    unknown = sorted(set(methods) - set(method_names()))
    if unknown:
        sys.stderr.write(f"rankbench: plan.methods names {', '.join(unknown)}; "
                         f"valid: {', '.join(method_names())}\n")
        return 2
    notes: list[str] = []
    table = rows(overrides, methods, _listed(_value(argv, "plan.budgets=")) or BUDGETS,
                 int(_value(argv, "plan.gpus=") or 1), notes)
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    sys.stdout.write("\n".join(lines + notes) + "\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main(sys.argv[1:]))
