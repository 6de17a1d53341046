"""`trainer.compile`: compiled training matches eager, compile time is kept apart from step time, and a
model that cannot be compiled trains eager after one log line."""
import logging
import shutil

import pytest
import torch
from rbtest import NATIVE_METHODS, compose_config
from torch import nn

import methods
from runners.engine import compiled
from runners.train import run

RUN = ["dataset=shapes", "trainer.log_every=1", "trainer.max_steps=5", "trainer.timing_warmup=0"]


def test_counts_and_compile_fields_are_recorded_only_as_asked(tiny_overrides):
    record = run(compose_config(["method=lora", *RUN, *tiny_overrides]))
    cost = record["cost"]
    assert cost["flops_per_step"] > 0 and cost["ops_per_step"] > 0
    assert "compiled" not in cost and "compile_time_s" not in cost  # trainer.compile is off by default


def test_a_model_that_cannot_be_compiled_trains_eager_after_one_line(tiny_overrides, monkeypatch, caplog):
    class Refusing(torch.nn.Module):
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            raise RuntimeError("backend failed\nsecond line of a long trace")

    monkeypatch.setattr(compiled.torch, "compile", Refusing)
    eager = run(compose_config(["method=lora", *RUN, *[o.replace("/run", "/eager") for o in tiny_overrides]]))
    with caplog.at_level(logging.WARNING, logger="runners.engine.compiled"):
        record = run(compose_config(["method=lora", "trainer.compile=true", *RUN, *tiny_overrides]))
    assert record["run"]["status"] == "success"
    assert record["cost"]["compiled"] is False and record["cost"]["compile_time_s"] is None
    (line,) = [r.getMessage() for r in caplog.records if "cannot be compiled" in r.getMessage()]
    assert "RuntimeError: backend failed" in line and "second line" not in line
    assert [h["loss"] for h in record["history"]] == [h["loss"] for h in eager["history"]]


def test_a_method_that_refuses_compile_trains_eager_saying_why(tiny_overrides, monkeypatch, caplog):
    """`AdapterLayer.compile_refusal`: the model is not handed to torch.compile; one line says why."""
    monkeypatch.setattr(methods.get_method("lora"), "compile_refusal", "its layers cannot be traced")
    monkeypatch.setattr(compiled.torch, "compile", lambda module: pytest.fail("compiled a refusing method"))
    eager = run(compose_config(["method=lora", *RUN, *[o.replace("/run", "/eager") for o in tiny_overrides]]))
    with caplog.at_level(logging.WARNING, logger="runners.engine.compiled"):
        record = run(compose_config(["method=lora", "trainer.compile=true", *RUN, *tiny_overrides]))
    assert record["cost"]["compiled"] is False and record["cost"]["compile_time_s"] is None
    (line,) = [r.getMessage() for r in caplog.records if "is not compiled" in r.getMessage()]
    assert "lora: its layers cannot be traced" in line
    assert [h["loss"] for h in record["history"]] == [h["loss"] for h in eager["history"]]


def test_compile_must_be_a_boolean(tiny_overrides):
    from runners.engine.config import check_values
    problems = check_values(compose_config(["trainer.compile=yes", *tiny_overrides]))
    assert "trainer.compile=yes is not valid" in problems


# rbtest.NATIVE_METHODS: a PEFT-backed method runs PEFT's own layers
NATIVE = NATIVE_METHODS


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on the CPU builds C++ kernels: install g++ (make setup does)")
@pytest.mark.parametrize("method", NATIVE)
def test_compiled_training_matches_eager(method, tiny_overrides):
    """The same losses step by step (inductor reorders float sums: within 1e-4 relative), the compile
    time recorded apart from the step time."""
    torch._dynamo.reset()  # compiled code of earlier tests in this process would make the first step cheap
    eager_dirs = [o.replace("/run", "/eager") for o in tiny_overrides]
    eager = run(compose_config([f"method={method}", *RUN, *eager_dirs]))
    record = run(compose_config([f"method={method}", "trainer.compile=true", *RUN, *tiny_overrides]))
    cost = record["cost"]
    assert cost["compiled"] is True, "compiling failed: see the log line"
    assert cost["compile_time_s"] > cost["step_time_s"] > 0
    assert ([h["loss"] for h in record["history"]]
            == pytest.approx([h["loss"] for h in eager["history"]], rel=1e-4))


def two_layer_stack(method: str) -> nn.Module:
    """Linear(30, 30), tanh, Linear(30, 30), both adapted: at 256 tokens RandLoRA (r=4) takes the merged
    path and keeps W + dW in its `DeltaCache` (n r x d = 32 x 30 >= 30 x 30), in both layers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 30), nn.Tanh(), nn.Linear(30, 30))
    methods.inject(model, method, ["0", "2"], r=4)
    with torch.no_grad():   # leave dW == 0 behind: every parameter moves the loss from step one
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape) * 0.05)
    return model


def train_steps(model: nn.Module, compiled: nn.Module, eager_steps: int, steps: int
                ) -> tuple[list[float], list[bool]]:
    """Losses of `steps` fused-AdamW steps, the first `eager_steps` eager (as the runner measures them),
    and whether every layer's kept tensor was gone after each optimizer step."""
    gen = torch.Generator().manual_seed(1)
    x, target = torch.randn(256, 30, generator=gen), torch.randn(256, 30, generator=gen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    losses, cleared = [], []
    for step in range(steps):
        loss = ((model if step < eager_steps else compiled)(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        cleared.append(not any(list(layer.delta_cache) for layer in methods.adapter_layers(model).values()))
    return losses, cleared


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on the CPU builds C++ kernels: install g++ (make setup does)")
@pytest.mark.parametrize("method", NATIVE)
def test_compiled_layers_train_as_eager(method):
    """Compiled steps after eager ones (the runner's first steps are measured eager) follow eager's
    losses, and an optimizer step drops every kept dW (RandLoRA's kept W + dW once outlived it under
    compile: methods/fastpath.py `DeltaCache`). With the runner's dynamo settings the stack is one graph
    (`fullgraph`): a graph break in an adapted linear made a frame per layer that dynamo recompiled per
    shape until its recompile limit (LoHa and LoKr take the merged path here, RandLoRA keeps W + dW)."""
    torch._dynamo.reset()
    want, _ = train_steps(two_layer_stack(method), nn.Identity(), eager_steps=5, steps=5)
    model = two_layer_stack(method)
    with compiled.dynamo_settings():
        got, cleared = train_steps(model, torch.compile(model, fullgraph=True), eager_steps=2, steps=5)
    assert cleared == [True] * 5
    assert got == pytest.approx(want, rel=1e-4)
    assert len(set(want)) == 5   # the steps moved the loss: a stale weight would show
