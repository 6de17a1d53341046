"""FSDP2 (`trainer.strategy=fsdp`) on the CPU with gloo, 2 processes: the gradients of a sharded tiny CLIP
equal one process's, a torchrun run trains as one process does (LoRA and full fine-tuning), resumes from its
sharded checkpoint after a kill, and a checkpoint with a missing shard is moved aside with one line."""
import json
import os
from typing import Any

import pytest
import torch
from rbtest import compose_config
from safetensors.torch import load_file
from test_distributed import ARGS, DYING_RUN, KILL_IN_STEP, ROOT, torchrun

from runners.engine import distributed
from runners.engine.memplan import skeleton
from runners.train import RunFailed, run

FSDP = ["trainer.strategy=fsdp"]


class FeatureLoss:
    """A per-example loss (mean over the rows), so half the rows on each of 2 processes average to the
    whole."""

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        img = model.visual_projection(model.vision_model(pixel_values=batch["pixel_values"]).pooler_output)
        txt = model.text_projection(model.text_model(input_ids=batch["input_ids"]).pooler_output)
        return (img.pow(2).mean() + txt.pow(2).mean()) * model.logit_scale


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {"pixel_values": torch.randn(4, 3, 32, 32, generator=gen),
            "input_ids": torch.randint(0, 58, (4, 6), generator=gen)}  # tiny-clip: vocabulary 58, 32 px


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return skeleton(compose_config(["task=clip"]).task, device="cpu").float()


def _sharded_grads(rank: int, world: int, port: int, queue: Any) -> None:
    """One process: the model sharded per block, half the batch, the gradients gathered whole."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    distributed.setup(torch.device("cpu"))
    model = _model()
    step = distributed.wrap(model, FeatureLoss(), torch.device("cpu"), find_unused=False, strategy="fsdp")
    rows = slice(rank * 2, rank * 2 + 2)
    loss = step({k: v[rows] for k, v in _batch().items()})
    loss.backward()
    grads = {n: None if p.grad is None else
             (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).tolist()
             for n, p in model.named_parameters()}
    queue.put((rank, float(loss.detach()), grads, distributed.is_sharded(model)))


@pytest.mark.slow
def test_sharded_gradients_equal_one_process():
    """Every parameter of the tiny CLIP trained (full fine-tuning), its scalar logit_scale included (left
    whole by FSDP2, its gradient averaged by a hook): the gathered gradients equal one process's."""
    import torch.multiprocessing as mp

    model = _model()
    expected = FeatureLoss().loss(model, _batch())
    expected.backward()
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), 29700 + os.getpid() % 1000
    procs = [ctx.Process(target=_sharded_grads, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {r: (loss, grads, sharded)
               for r, loss, grads, sharded in (queue.get(timeout=300) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
    assert results[0][2] and results[1][2]
    assert (results[0][0] + results[1][0]) / 2 == pytest.approx(float(expected.detach()), rel=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    scale = max(float(g.abs().max()) for g in grads.values())  # k_proj biases get ~0 (softmax ignores them)
    assert grads.keys() == {n for n, g in results[0][1].items() if g is not None}
    assert all(torch.allclose(torch.tensor(results[0][1][n]), g, rtol=1e-4, atol=1e-6 * scale)
               for n, g in grads.items())
    assert results[0][1] == results[1][1]  # every rank gathers the same gradients


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_fsdp_run_trains_as_one_process(method, tmp_path):
    args = [f"method={method}", "trainer.checkpoint_every=0"]
    two = torchrun(ROOT / "run.py", tmp_path / "fsdp", tmp_path, *FSDP, *args)
    assert two.returncode == 0, two.stderr[-3000:]
    fsdp = json.loads((tmp_path / "fsdp" / "results.json").read_text())
    one = run(compose_config([*ARGS, *args, f"out_dir={tmp_path / 'single'}"]))
    assert ((fsdp["run"]["strategy"], fsdp["run"]["world_size"], one["run"]["strategy"])
            == ("fsdp", 2, "single"))
    assert ([h["loss"] for h in fsdp["history"]]
            == pytest.approx([h["loss"] for h in one["history"]], rel=1e-5))
    assert fsdp["metrics"]["per_dataset"] == pytest.approx(one["metrics"]["per_dataset"], abs=1e-9)
    assert fsdp["cost"]["state_bytes"] < 0.6 * one["cost"]["state_bytes"]  # each rank holds half the state
    if method == "lora":  # the exported adapters: same tensors
        a, b = (load_file(next((tmp_path / d / "adapter").glob("*.safetensors"))) for d in ("fsdp", "single"))
        scale = max(float(t.abs().max()) for t in b.values())  # AdamW normalises away a tiny grad's scale
        assert a.keys() == b.keys()
        assert all(float((a[k] - b[k]).abs().max()) <= 1e-4 * scale for k in a)


@pytest.mark.slow
def test_fsdp_run_resumes_from_its_sharded_checkpoint_after_a_kill(tmp_path):
    out = tmp_path / "fsdp"
    dying = tmp_path / "dying_run.py"
    dying.write_text(DYING_RUN)
    killed = torchrun(dying, out, tmp_path, *FSDP)
    assert killed.returncode != 0 and (out / "checkpoint.pt").exists()
    shards = out / f"checkpoint-{KILL_IN_STEP - 1}.dcp"
    assert sorted(p.name for p in shards.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]

    resumed = torchrun(ROOT / "run.py", out, tmp_path, *FSDP)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {KILL_IN_STEP - 1}" in resumed.stderr
    assert not shards.exists() and not (out / "checkpoint.pt").exists()
    whole = torchrun(ROOT / "run.py", tmp_path / "whole", tmp_path, *FSDP)
    assert whole.returncode == 0, whole.stderr[-3000:]
    a, b = (json.loads((d / "results.json").read_text()) for d in (out, tmp_path / "whole"))
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert a["metrics"]["per_dataset"] == b["metrics"]["per_dataset"]


@pytest.mark.slow
def test_a_sharded_checkpoint_missing_a_shard_is_moved_aside_and_the_run_restarts(tmp_path):
    out = tmp_path / "fsdp"
    dying = tmp_path / "dying_run.py"
    dying.write_text(DYING_RUN)
    assert torchrun(dying, out, tmp_path, *FSDP).returncode != 0
    shards = out / f"checkpoint-{KILL_IN_STEP - 1}.dcp"
    (shards / "__1_0.distcp").unlink()  # a node lost before its shard reached the shared disk
    rerun = torchrun(ROOT / "run.py", out, tmp_path, *FSDP)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    lines = [x for x in rerun.stderr.splitlines() if "cannot be read" in x]
    assert len(lines) == 1 and f"checkpoint {shards} cannot be read (" in lines[0]
    assert lines[0].endswith("training from the start (trainer.on_bad_checkpoint=restart)")
    kept = sorted(p.name.split(".unreadable-")[0] for p in out.glob("*.unreadable-*"))
    assert kept == [shards.name, "checkpoint.pt"]  # the shards and the file pointing to them, both kept
    assert json.loads((out / "results.json").read_text())["history"][0]["step"] == 1


def test_fsdp_on_one_process_is_refused_before_anything_is_built(tmp_path):
    with pytest.raises(RunFailed, match=r"^trainer.strategy=fsdp needs several processes \(torchrun "):
        run(compose_config([*ARGS, *FSDP, f"out_dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "run").exists()


def test_the_wrapping_policy_finds_the_blocks_of_every_task_model():
    for task in ("clip", "vision", "language"):
        cfg = compose_config([f"task={task}"])
        assert distributed.strategy_problem("fsdp", 2, cfg.task) is None
        assert len(distributed.transformer_blocks(skeleton(cfg.task))) >= 2
