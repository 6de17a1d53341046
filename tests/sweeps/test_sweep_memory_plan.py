"""A sweep checks each job's memory plan against the card before it submits (runners/engine/memplan.py):
one over it stops the sweep (plan.over=refuse) or is skipped with its line (plan.over=skip)."""
import pytest
from sweephelpers import DATA, run_py

# tiny CLIP at micro-batch 16 as a bf16 GPU run plans it: LoRA ~23 MiB, full fine-tuning ~29 MiB, head-only
# ~6 MiB; a 25.6 MiB card with no allowance holds all but full fine-tuning
SWEEP = ["-m", "+sweep=budget", "task=clip", "sweep.methods=[lora]", "sweep.budgets=[lora8]",
         "sweep.seeds=[0]", "sweep.references=[full,none]", "sweep.dry_run=true", "plan.gpu_memory_gb=0.025",
         "plan.allowance_gb=0", "logger=none", *DATA]


@pytest.mark.slow
def test_a_job_over_the_card_stops_the_sweep_before_anything_is_submitted(tmp_path):
    out = run_py([*SWEEP, f"sweep.root={tmp_path / 'multirun'}"], cwd=tmp_path)
    assert out.returncode != 0
    line = next(x for x in out.stdout.splitlines() if x.startswith("rankbench:"))
    assert line.startswith("rankbench: 1 job(s) cannot fit the GPU, nothing submitted; "
                           "first: shapes/full-s0: predicted peak ")
    assert "> 25.6 MiB per GPU" in line and "FSDP over 2 GPUs" in line and line.endswith("set plan.over=skip")
    assert "would launch" not in out.stdout


@pytest.mark.slow
def test_a_sweep_may_skip_the_jobs_over_the_card_with_one_line_each(tmp_path):
    out = run_py([*SWEEP, "plan.over=skip", f"sweep.root={tmp_path / 'multirun'}"], cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:]
    skipped = [x for x in out.stdout.splitlines() if "not launching shapes/full-s0: predicted peak" in x]
    assert len(skipped) == 1
    launched = [x.split("would launch ", 1)[1].split(" ", 1)[0] for x in out.stdout.splitlines()
                if "would launch " in x]
    assert launched == ["shapes/lora-lora8-s0", "shapes/none-s0"]
    assert "dry run, 2 of 3 runs would launch" in out.stdout
