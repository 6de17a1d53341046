"""`trainer.compile`: the training step through `torch.compile`, its compile time apart from step time.

The first compiled step traces and compiles the forward and the backward (inductor; on the CPU it builds
C++ kernels, so a C++ compiler must be installed); it is timed on its own and kept out of the step-time
statistics: `cost.compile_time_s` is that step's time minus the median step time. A model that cannot be
compiled (a backend error, an unsupported construct) is named in one log line, and the run trains eager
from that step on (`run.compile` records which happened). The steps the runner measures with counting
modes or saved-tensor hooks (runners.engine.measure) run eager: those modes watch what eager dispatches.

Compiled steps run under `DYNAMO_SETTINGS`. `trace_autograd_ops` lets dynamo trace the
`torch.autograd.grad` that the merged path's backward calls for a method without closed-form gradients
(LoHa, LoKr: methods/fastpath.py `_param_grads`). Off (torch 2.13.0's default), that call made dynamo give
up on the whole autograd function: a graph break in every adapted linear, each one a frame that dynamo
compiled again per weight shape and per input `requires_grad` (`TORCH_LOGS=recompiles`:
"tensor 'x' requires_grad mismatch", "size mismatch ... expected 64, actual 32") until its recompile
limit (8) left the rest eager.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import methods
from runners.engine.measure import StepTimer

log = logging.getLogger(__name__)

#: torch._dynamo.config values the compiled steps run with (see the module docstring)
DYNAMO_SETTINGS: dict[str, Any] = {"trace_autograd_ops": True}


def dynamo_settings() -> contextlib.AbstractContextManager:
    """`DYNAMO_SETTINGS` for the duration of a compiled step (traced there), the defaults elsewhere."""
    return torch._dynamo.config.patch(**DYNAMO_SETTINGS)


class StepRunner:
    """Runs one optimizer step with the module eager or compiled (`trainer.compile`)."""

    def __init__(self, module: nn.Module, enabled: bool, device: torch.device, label: str) -> None:
        self.eager, self.label = module, label
        self.requested = enabled
        self.error: str | None = compile_refusal(module) if enabled else None
        if self.error is not None:
            log.warning("trainer.compile: %s is not compiled (%s); training eager", label, self.error)
        self.compiled: nn.Module | None = torch.compile(module) if enabled and self.error is None else None
        self.timer = StepTimer(device, warmup=0)   # the first compiled step alone
        self.steady = True                         # the last step's time belongs to step-time statistics

    def run(self, step: Callable[[nn.Module], Any], eager: bool = False) -> Any:
        """`step(module)` with the eager or the compiled module; the first compiled step is timed here."""
        if self.compiled is None or eager:
            self.steady = True
            return step(self.eager)
        if self.timer.times:
            self.steady = True
            with dynamo_settings():
                return step(self.compiled)
        self.steady = False
        self.timer.start()
        try:
            with dynamo_settings():
                out = step(self.compiled)
        except Exception as err:
            self.error = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err) else ''}"
            log.warning("trainer.compile: %s cannot be compiled (%s); training eager", self.label, self.error)
            self.compiled = None
            return step(self.eager)
        self.timer.stop()
        return out

    def status(self) -> str | None:
        """`run.compile`: None (off), "compiled", or "eager: <why>" when compiling failed."""
        if not self.requested:
            return None
        return "compiled" if self.error is None else f"eager: {self.error}"

    def compile_time_s(self, median_step_s: float | None) -> float | None:
        """The first compiled step's time minus the median step time (None: nothing compiled)."""
        if not self.timer.times or self.error is not None:
            return None
        return max(0.0, self.timer.times[0] - (median_step_s or 0.0))


def compile_refusal(module: nn.Module) -> str | None:
    """Why the model must train eager: the first adapter layer whose method declares it
    (`AdapterLayer.compile_refusal`); None when every layer may be compiled."""
    for layer in methods.adapter_layers(module).values():
        if type(layer).compile_refusal is not None:
            return f"{type(layer).method}: {type(layer).compile_refusal}"
    return None
