"""Adapter methods for rankbench: LoRA, LoHa, LoKr and RandLoRA at equal parameter budgets.

Public API (stable, see DESIGN.md): `available`, `num_params`, `wrap_linear`, `inject`,
`count_trainable`, `solve_budget`, `merge`, `unmerge`, `save_adapter`, `load_adapter`; plus
`adapter_layers`, `num_params_model`, `resolve_budget`, `solve_budget_report`, `find_targets`,
`get_method`, `register` and `AdapterLayer` for the runner and for new methods.
"""
from . import lora, loha, lokr, randlora  # noqa: F401, I001  (registration order = available() order)
from .base import AdapterLayer, available, get_method, register
from .budget import BudgetSolution, resolve_budget, solve_budget, solve_budget_report
from .inject import (
    adapter_layers,
    count_trainable,
    find_targets,
    inject,
    load_adapter,
    merge,
    num_params,
    num_params_model,
    save_adapter,
    unmerge,
    wrap_linear,
)

__all__ = [
    "AdapterLayer", "BudgetSolution", "adapter_layers", "available", "count_trainable", "find_targets",
    "get_method", "inject", "load_adapter", "merge", "num_params", "num_params_model", "register",
    "resolve_budget", "save_adapter", "solve_budget", "solve_budget_report", "unmerge", "wrap_linear",
]
