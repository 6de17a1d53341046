"""The memory plan (runners/engine/memplan.py): predicted state and activations against what a real CPU run
measures, the per-block derivation of gradient checkpointing against a real checkpointed forward, the
large models' plans from their published architectures, and the one-line verdicts."""
import json

import pytest
import torch
from rbtest import compose_config

from runners.engine import memplan
from runners.engine.measure import SavedActivations
from runners.engine.memplan import GiB, Plan
from runners.train import run

ONE_STEP = ["trainer.max_steps=1", "trainer.checkpoint_every=0", "trainer.batch_size=16",
            "task.data.train_size=32", "task.data.test_size=16", "threads=1", "logger=none",
            "trainer.timing_warmup=0"]

# predicted / measured activation bytes on the tiny models (CPU, fp32). The meta device's attention is the
# math path (it saves the attention weights; the CPU kernel saves O(S)) and the plan's CLIP batch carries one
# 77-token prompt per image where the task tokenises each class's prompt once (a few tokens): overestimates.
ACTIVATION_RATIO = {"vision": (1.0, 1.3), "clip": (1.0, 3.0)}


@pytest.mark.slow
@pytest.mark.parametrize("task", ["vision", "clip"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_run_records_its_prediction_beside_what_it_measured(task, method, tmp_path):
    record = run(compose_config([f"task={task}", f"method={method}", "budget=lora8", "dataset=shapes",
                                 *ONE_STEP, f"out_dir={tmp_path}"]))
    cost = record["cost"]
    head = record["params"]["head_trainable"] * 4 * 4 + (4 if record["params"]["head_trainable"] else 0)
    # exact: the same tensors, counted from shapes and dtypes on meta (the vision head is not in the skeleton)
    assert cost["predicted_state_bytes"] + head == pytest.approx(cost["state_bytes"], abs=8)
    low, high = ACTIVATION_RATIO[task]
    assert low <= cost["predicted_activation_bytes"] / cost["activation_bytes"] <= high
    assert cost["predicted_peak_bytes"] > cost["predicted_activation_bytes"] + cost["predicted_state_bytes"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["cost"]["predicted_peak_bytes"] == cost["predicted_peak_bytes"]


def test_the_meta_trace_counts_what_a_real_forward_saves():
    """The same batch through the same architecture: on meta (the plan) and on the CPU (the runner's
    counter)."""
    cfg = compose_config(["task=vision", "method=lora", "budget=lora4"])
    meta = memplan.skeleton(cfg.task)
    real = memplan.skeleton(cfg.task, device="cpu")
    batch = memplan.example_batch(meta, cfg.task, 8)
    predicted = memplan.trace_activations(meta, batch, checkpointing=False, bf16=False)
    counter = SavedActivations(real)
    with counter.recording():
        real.train()(pixel_values=torch.zeros(batch["pixel_values"].shape))
    assert 1.0 <= predicted / counter.bytes <= 1.1


def test_checkpointing_keeps_block_inputs_and_one_block():
    """The per-block derivation: far below the full trace, above the blocks' inputs alone."""
    cfg = compose_config(["task=vision", "method=full"])
    model = memplan.skeleton(cfg.task)
    batch = memplan.example_batch(model, cfg.task, 8)
    full = memplan.trace_activations(model, batch, checkpointing=False, bf16=False)
    kept = memplan.trace_activations(model, batch, checkpointing=True, bf16=False)
    blocks = len(memplan.transformer_blocks(model))
    # one block's input
    hidden = 8 * (1 + (32 // model.config.patch_size) ** 2) * model.config.hidden_size * 4
    assert blocks * hidden < kept < full


def test_llama3_8b_full_fine_tuning_does_not_fit_one_80gb_card_and_lora_does():
    """From the published architecture (no download): 8.03B weights x (4 + 4 + 8) bytes of fp32 state."""
    full = memplan.job_plan(compose_config(["task=commonsense", "size=large", "method=full"]), 1)[0]
    assert full.state == pytest.approx(8.03e9 * 16, rel=0.01)
    assert full.peak + 2 * GiB > 80 * GiB and full.fsdp_gpus(80 * GiB, 2 * GiB) == 2
    lora = memplan.job_plan(compose_config(["task=commonsense", "size=large", "method=lora",
                                            "budget=lora16"]), 1)[0]
    assert lora.weights == pytest.approx(8.03e9 * 2, rel=0.01)  # frozen in bf16 (task.model.dtype)
    assert lora.peak + 2 * GiB < 80 * GiB


def test_a_job_over_the_card_gets_one_line_saying_what_would_fit():
    plan = Plan(weights=10 * GiB, state=60 * GiB, activations=20 * GiB, block_weights=GiB, micro_batch=8,
                checkpointing=False)
    line = memplan.verdict("full-s0", plan, card=80 * GiB, allowance=2 * GiB)
    assert line.startswith("full-s0: predicted peak 90.0 GiB + 2.0 GiB allowance > 80.0 GiB per GPU")
    assert "task.model.gradient_checkpointing=true" in line and "trainer.batch_size<=3" in line
    assert "FSDP over 2 GPUs" in line and "\n" not in line
    assert memplan.verdict("lora-s0", Plan(GiB, GiB, GiB, 0, 8, False), 80 * GiB, 2 * GiB) is None


def test_a_model_without_blocks_is_refused_in_one_line():
    with pytest.raises(ValueError, match="no transformer blocks to shard"):
        memplan.transformer_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_the_preflight_prints_the_plan_and_counts_a_job_over_the_card_as_a_problem():
    from runners.preflight import memory_plan

    line, over = memory_plan(compose_config(["task=clip", "method=full", "plan.gpu_memory_gb=0.001"]))
    assert line.startswith("memory plan (full, budget None, micro-batch 64): weights ")
    assert "DOES NOT FIT" in line
    assert len(over) == 1 and over[0].startswith("full at budget None: predicted peak ")
    line, over = memory_plan(compose_config(["task=clip", "method=lora", "budget=lora4",
                                             "plan.gpu_memory_gb=80"]))
    assert line.endswith("card 80.0 GiB: fits") and over == []


def test_the_plan_command_tables_each_job_with_its_fit_and_fsdp_gpus(capsys):
    from runners import plan

    code = plan.main(["task=clip", "trainer.batch_size=16", "plan.gpu_memory_gb=0.025", "plan.allowance_gb=0",
                      "plan.methods=[lora,full]", "plan.budgets=[lora8]"])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert code == 0 and set(rows) == {"lora@lora8", "full"}
    assert rows["lora@lora8"][-2:] == ["yes", "-"] and rows["full"][-2:] == ["NO", "2"]
    assert plan.main(["plan.methods=[lorra]"]) == 2


def test_a_job_whose_forward_cannot_run_on_meta_is_planned_as_unknown_with_one_warning(caplog):
    # PEFT's WaveFT builds its update by indexing with a mask; nonzero() has no meta kernel
    cfg = compose_config(["task=clip", "method=waveft", "budget=lora8", "dataset=shapes", "logger=none"])
    with caplog.at_level("WARNING"):
        assert memplan.over_card([("shapes/waveft", cfg)], cfg.plan, processes=1, show=True) == []
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "cannot be traced on the meta device" in warned[0]


def test_jobs_that_differ_only_in_their_lr_schedule_are_planned_once(monkeypatch):
    # a tuned sweep's lr candidates: same tensors, so one plan; a batch size changes the plan
    calls = []
    monkeypatch.setattr(memplan, "_plan_or_none", lambda name, cfg, processes: calls.append(name))
    base = ["task=clip", "method=lora", "budget=lora8", "dataset=shapes", "plan.gpu_memory_gb=80"]
    jobs = [(f"lr{lr}", compose_config([*base, f"++method.lr={lr}", f"trainer.warmup_steps={w}"]))
            for lr, w in ((1e-3, 10), (4e-3, 0))]
    jobs.append(("b16", compose_config([*base, "trainer.batch_size=16"])))
    memplan.over_card(jobs, jobs[0][1].plan, processes=1)
    assert calls == ["lr0.001", "b16"]
