"""Interrupt-and-resume equals uninterrupted, in-process (the SLURM preemption version is in
test_sweep_slurm)."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from sweephelpers import DATA

import runners.train
from runners.engine.checkpoint import FILENAME as CHECKPOINT
from runners.record import builder
from runners.train import run

CONF = Path(__file__).resolve().parents[2] / "conf"
STEPS, EVERY, KILL_AT = 6, 2, 5  # checkpoints after steps 2 and 4; killed during step 5


class Preempted(BaseException):
    """Like submitit's SystemExit on preemption: not an Exception, so the runner records no failure."""


def tiny(out_dir: Path, *extra: str):
    overrides = [f"out_dir={out_dir}", "logger=none", f"trainer.max_steps={STEPS}", "trainer.log_every=1",
                 "trainer.timing_warmup=1", f"trainer.checkpoint_every={EVERY}", *DATA, *extra]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.fixture(autouse=True)
def one_thread():
    """Like the subprocess sweeps: 2 shared cores thrash with more threads (and results stay comparable)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config_hash(cfg) -> str:
    return builder.config_hash(builder.config_dict(cfg))


def comparable(record: dict) -> dict:
    """Everything a resumed run must reproduce exactly (timings and dates excluded)."""
    return {"metrics": {k: record["metrics"][k] for k in ("accuracy", "per_dataset", "delta_rank")},
            "loss": [(h["step"], h["loss"], h["lr"]) for h in record["history"]],
            "trainable": record["params"]["trainable"], "hp": record["run"]["hp"]}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "randlora"])
def test_interrupted_run_resumes_to_identical_metrics(method, tmp_path, monkeypatch, caplog):
    args = [f"method={method}", "budget=lora4", "task=clip"]
    reference = run(tiny(tmp_path / "reference", *args))

    real_step, calls = runners.train._optimizer_step, {"n": 0}

    def dying_step(*a, **k):
        calls["n"] += 1
        if calls["n"] == KILL_AT:
            raise Preempted
        return real_step(*a, **k)

    monkeypatch.setattr(runners.train, "_optimizer_step", dying_step)
    with pytest.raises(Preempted):
        run(tiny(tmp_path / "resumed", *args))
    assert (tmp_path / "resumed" / CHECKPOINT).exists()
    assert not (tmp_path / "resumed" / "results.json").exists()

    monkeypatch.setattr(runners.train, "_optimizer_step", real_step)
    with caplog.at_level("INFO", logger="runners.engine.checkpoint"):
        resumed = run(tiny(tmp_path / "resumed", *args))
    assert f"at step {KILL_AT - 1}" in caplog.text  # resumed, not restarted
    assert comparable(resumed) == comparable(reference)
    assert json.loads((tmp_path / "resumed" / "results.json").read_text())["run"]["status"] == "success"
    assert not (tmp_path / "resumed" / CHECKPOINT).exists()  # removed once the run succeeded


def test_changing_what_a_run_computes_changes_its_identity(tmp_path):
    """A checkpoint is resumed only under the same config hash, so a changed run restarts."""
    cfg = tiny(tmp_path / "run", "method=lora")
    other = tiny(tmp_path / "run", "method=lora", "trainer.lr=0.5")
    assert config_hash(cfg) != config_hash(other)
    assert config_hash(cfg) == config_hash(tiny(tmp_path / "elsewhere", "method=lora", "logger=wandb"))


def test_narrowing_a_sweep_keeps_the_run_identity():
    """A run checkpointed under `sweep.seeds=[0]` must resume when the full sweep is re-run."""
    one = tiny(Path("/tmp/x"), "+sweep=budget", "method=lora", "sweep.seeds=[0]")
    full = tiny(Path("/tmp/x"), "+sweep=budget", "method=lora")
    def hash_of(cfg):
        return builder.config_hash(builder.config_dict(cfg))

    assert hash_of(one) == hash_of(full)


class Requeued(BaseException):
    """Raised by the stand-in for submitit's USR2 handler (which requeues the job and exits)."""


def test_preemption_signal_checkpoints_the_step_it_arrived_in(tmp_path, monkeypatch):
    args = ["method=lora", "task=clip", "trainer.checkpoint_every=0"]  # no periodic checkpoints at all
    reference = run(tiny(tmp_path / "reference", *args))
    real_step, calls = runners.train._optimizer_step, {"n": 0}

    def signalled_step(*a, **k):
        calls["n"] += 1
        loss = real_step(*a, **k)
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGUSR2)  # SLURM/submitit: time limit or preemption
        return loss

    def submitit_like_handler(signum, frame):
        raise Requeued

    monkeypatch.setattr(runners.train, "_optimizer_step", signalled_step)
    previous = signal.signal(signal.SIGUSR2, submitit_like_handler)
    try:
        with pytest.raises(Requeued):
            run(tiny(tmp_path / "resumed", *args))
    finally:
        signal.signal(signal.SIGUSR2, previous)
    saved = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=False)
    assert saved["step"] == 3  # the step in flight when the signal came, not a periodic one
    monkeypatch.undo()
    resumed = run(tiny(tmp_path / "resumed", *args))
    assert comparable(resumed) == comparable(reference)
    assert signal.getsignal(signal.SIGUSR2) is previous  # the runner leaves handlers as it found them
