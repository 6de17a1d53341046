"""Data-parallel runs (DDP) on the CPU with gloo: `torchrun --nproc_per_node=2 run.py ...` writes one
results.json, matches a single-process run of the same effective batch, and resumes after a kill."""
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from rbtest import ROOT, compose_config

from runners.engine.distributed import World, first_host, from_env
from runners.train import run
from tasks.gather import gather_rows, per_process_share

TORCHRUN = Path(sys.executable).with_name("torchrun")
ARGS = ["method=lora", "task=clip", "dataset=shapes", "trainer.max_steps=6", "trainer.batch_size=16",
        "task.data.train_size=64", "task.data.test_size=32", "logger=none", "threads=1",
        "trainer.log_every=1", "trainer.timing_warmup=1", "trainer.checkpoint_every=2"]
KILL_IN_STEP = 3  # both ranks die in step 3; the checkpoint of step 2 is where the rerun resumes

# run.py with every rank killed (SIGKILL, like a node lost) in its optimizer step KILL_IN_STEP
DYING_RUN = f"""
import os, runpy, signal, sys
sys.path.insert(0, {str(ROOT)!r})
import runners.train as train
real, calls = train._optimizer_step, [0]
def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] == {KILL_IN_STEP}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
train._optimizer_step = dying
sys.argv[0] = {str(ROOT / "run.py")!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("env, world, master", [
    ({}, World(), {}),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, World(1, 2, 1), {}),  # torchrun sets the master
    ({"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
      "SLURM_STEP_NODELIST": "gpu[07-08]"}, World(3, 4, 1), {"MASTER_ADDR": "gpu07", "MASTER_PORT": "23456"}),
    ({"SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1",
      "SUBMITIT_LOCAL_JOB_ID": "4242"}, World(1, 2, 1), {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "24242"}),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, World(), {}),  # an allocation, not an srun step: one process
])
def test_world_comes_from_the_launcher(env, world, master):
    assert from_env(env) == (world, master)


@pytest.mark.parametrize("nodelist, host", [("node1", "node1"), ("gpu[07-09,12],cpu1", "gpu07"),
                                            ("a-b[3,5]", "a-b3"), ("c1,c2", "c1")])
def test_first_host_of_a_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


def torchrun(script: Path, out: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(script), *ARGS, *extra, f"out_dir={out}",
           f"hydra.run.dir={cwd / 'hydra'}"]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow
def test_ddp_run_resumes_after_a_kill_and_matches_one_process(tmp_path):
    out = tmp_path / "ddp"
    dying = tmp_path / "dying_run.py"
    dying.write_text(DYING_RUN)
    killed = torchrun(dying, out, tmp_path)
    assert killed.returncode != 0 and (out / "checkpoint.pt").exists() and not (out / "results.json").exists()

    resumed = torchrun(ROOT / "run.py", out, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {KILL_IN_STEP - 1}" in resumed.stderr  # resumed, not restarted
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("results.json")] == [Path("ddp/results.json")]
    ddp = json.loads((out / "results.json").read_text())
    assert ddp["run"]["status"] == "success" and ddp["run"]["world_size"] == 2
    assert not (out / "checkpoint.pt").exists()

    single = run(compose_config([*ARGS, f"out_dir={tmp_path / 'single'}"]))  # batch 16 = 2 ranks x 8
    assert single["run"]["world_size"] == 1
    assert [h["step"] for h in ddp["history"]] == [h["step"] for h in single["history"]]
    assert ([h["loss"] for h in ddp["history"]]
            == pytest.approx([h["loss"] for h in single["history"]], rel=1e-5))
    assert ddp["metrics"]["per_dataset"] == pytest.approx(single["metrics"]["per_dataset"], abs=1e-9)


def test_a_batch_that_does_not_split_over_the_processes_is_refused_before_anything_starts(tmp_path,
                                                                                          monkeypatch):
    from runners.train import RunFailed

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc_per_node=2 sets it
    with pytest.raises(RunFailed, match=r"^trainer.batch_size=15 is not divisible by the 2 processes of this "
                                        r"run; use a multiple of 2"):
        run(compose_config([*ARGS, "trainer.batch_size=15", f"out_dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "run").exists()


def _contrast(mine: torch.Tensor, every: torch.Tensor, labels: torch.Tensor,
              every_label: torch.Tensor) -> torch.Tensor:
    """ClipTask's `in_batch` objective on features: each row against every row, target = first same label."""
    first = (every_label[None, :] == labels[:, None]).int().argmax(1)
    return torch.nn.functional.cross_entropy(10 * mine @ every.T, first)


def _token_mean(nll: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The commonsense task's per-token mean (tasks/commonsense.py loss) on per-token losses."""
    return (nll * mask).sum() / per_process_share(mask.sum())


LOSSES = {"in_batch": lambda x, labels: _contrast(x, gather_rows(x), labels, gather_rows(labels)),
          "token_mean": lambda x, mask: _token_mean(x.sum(-1).pow(2), mask)}


def _spawned(rank: int, world: int, port: int, loss: str, rows: torch.Tensor, aux: torch.Tensor,
             queue: Any) -> None:
    """One process of a gloo group: `loss` on its slice of the rows, the gradient averaged over the
    processes as DDP averages it; plain values back through the queue (they outlive the process)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    share = slice(rank * len(rows) // world, (rank + 1) * len(rows) // world)
    mine = rows[share].clone().requires_grad_(True)
    value = LOSSES[loss](mine, aux[share])
    value.backward()
    grads = [torch.empty_like(mine.grad) for _ in range(world)]
    dist.all_gather(grads, mine.grad / world)
    queue.put((rank, value.item(), torch.cat(grads).tolist()))
    dist.destroy_process_group()


@pytest.mark.parametrize("loss, aux", [
    ("in_batch", torch.tensor([0, 1, 0, 2, 1, 1, 3, 0])),
    # 4 tokens on rank 0, 1 on rank 1
    ("token_mean", torch.tensor([1, 1, 1, 1, 1, 0, 0, 0], dtype=torch.float64)),
])
def test_data_parallel_losses_equal_the_single_process_loss_and_gradient(loss, aux):
    """CLIP's in-batch contrast sees the whole global batch (gather_rows) and the per-token mean counts the
    whole batch's tokens (per_process_share): 2 gloo processes with half of the rows each reproduce one
    process's loss (mean over ranks) and gradient (DDP's average), where per-process losses would not."""
    import torch.multiprocessing as mp

    gen = torch.Generator().manual_seed(0)
    rows = torch.nn.functional.normalize(torch.randn(8, 5, generator=gen, dtype=torch.float64), dim=-1)
    single = rows.clone().requires_grad_(True)
    expected = LOSSES[loss](single, aux)
    expected.backward()
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_spawned, args=(r, 2, port, loss, rows, aux, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {r: (value, grad) for r, value, grad in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
    assert (results[0][0] + results[1][0]) / 2 == pytest.approx(expected.item(), rel=1e-12)
    assert torch.allclose(torch.tensor(results[0][1], dtype=torch.float64), single.grad,
                          rtol=1e-10, atol=1e-12)
    halves = [LOSSES[loss](rows[s].clone(), aux[s]).item() for s in (slice(0, 4), slice(4, 8))]  # no group
    assert sum(halves) / 2 != pytest.approx(expected.item(), rel=1e-3)  # what each process computed before


@pytest.mark.slow
def test_ddp_in_batch_clip_loss_matches_one_process(tmp_path):
    """The official code's in-batch objective over 2 gloo processes trains as one process on the batch."""
    extra = ["task.objective.loss=in_batch", "trainer.checkpoint_every=0"]
    ddp = torchrun(ROOT / "run.py", tmp_path / "ddp", tmp_path, *extra)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    two = json.loads((tmp_path / "ddp" / "results.json").read_text())
    one = run(compose_config([*ARGS, *extra, f"out_dir={tmp_path / 'single'}"]))
    assert two["run"]["world_size"] == 2
    assert [h["loss"] for h in two["history"]] == pytest.approx([h["loss"] for h in one["history"]], rel=1e-5)
