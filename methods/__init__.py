"""Adapter methods for rankbench (LoRA, LoHa, LoKr, RandLoRA, ...) at equal parameter budgets.

Public API (stable: outside code calls exactly these): `available`, `num_params`, `wrap_linear`, `inject`,
`count_trainable`, `solve_budget`, `merge`, `unmerge`, `save_adapter`, `load_adapter`; plus
`adapter_layers`, `num_params_model`, `resolve_budget`, `solve_budget_report`, `find_targets`,
`get_method`, `leave_untrained`, `register` and `AdapterLayer` for the runner and for new methods.
"""
import importlib
import pkgutil

from .base import AdapterLayer, available, get_method, register
from .budget import BudgetSolution, resolve_budget, solve_budget, solve_budget_report
from .inject import (
    adapter_layers,
    count_trainable,
    find_targets,
    inject,
    leave_untrained,
    load_adapter,
    merge,
    num_params,
    num_params_model,
    save_adapter,
    unmerge,
    wrap_linear,
)

# Every module of the package is imported, so a method registers itself by existing: a new method is its
# file, its conf/method/<name>.yaml and its tests, with no list to extend here. Modules are imported in
# name order, which is the order of `available()`.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "AdapterLayer", "BudgetSolution", "adapter_layers", "available", "count_trainable", "find_targets",
    "get_method", "inject", "leave_untrained", "load_adapter", "merge", "num_params", "num_params_model",
    "register", "resolve_budget", "save_adapter", "solve_budget", "solve_budget_report", "unmerge",
    "wrap_linear",
]
