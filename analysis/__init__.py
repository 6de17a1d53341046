"""Results -> tidy pandas tables -> paper figures and a one-command report.

`load` turns result files (or a W&B project) into one tidy DataFrame, `aggregate` holds the pure
statistics (seed aggregation, Pareto fronts, normalisation to LoRA), `plots` draws the figures and
`report` is the thin CLI: ``python -m analysis.report DIR [DIR...] --out report/``.
"""
from analysis.aggregate import aggregate_seeds, normalise_to_lora, pareto_front, pareto_mask, per_run
from analysis.load import ResultsError, load_results, load_wandb

__all__ = [
    "ResultsError",
    "aggregate_seeds",
    "load_results",
    "load_wandb",
    "normalise_to_lora",
    "pareto_front",
    "pareto_mask",
    "per_run",
]
