"""+sweep=tuned: lr candidates trained and scored on validation at the first seed, then the validation
winner at every seed on test. Expansion and winner selection are pure; one small real sweep is slow."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from sweephelpers import TINY, mtimes, results, run_py

from runners.engine.optimizer import method_lr
from runners.record.results import write_results
from runners.sweeps.sweeper import (
    TuneGroup,
    candidate_score,
    choose_lr,
    final_jobs,
    registered_methods,
    tuned_groups,
    tuning_record,
)

CONF = Path(__file__).resolve().parents[2] / "conf"
ADAPTERS, REFERENCES = registered_methods()  # the registry, never a list here


def default_lr(method: str) -> float:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return method_lr(compose("config", overrides=["+sweep=tuned", "task=clip", f"method={method}"]))


def test_tuned_config_spans_16x_around_each_default_and_leaves_head_only_untuned():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["+sweep=tuned"])
    factors = list(cfg.sweep.lr_factors)
    assert len(factors) == 5 and max(factors) / min(factors) == 16 and 1.0 in factors
    assert cfg.sweep.methods == "all" and set(cfg.sweep.untuned) <= set(REFERENCES)


def test_stage_one_runs_every_candidate_at_the_first_seed_on_validation():
    methods, untuned = ADAPTERS[:2], REFERENCES[-1:]
    spec = {"methods": methods, "budgets": ["lora4"], "references": REFERENCES, "untuned": untuned,
            "seeds": [3, 4], "lr_factors": [0.5, 2.0], "datasets": ["shapes"]}
    defaults = {m: default_lr(m) for m in methods + REFERENCES}
    groups = tuned_groups(spec, defaults)
    assert ([(g.method, g.budget) for g in groups]
            == [(m, "lora4") for m in methods] + [(r, None) for r in REFERENCES])
    for group in groups:
        if group.method in untuned:
            assert group.candidates == ()
            continue
        lrs = [lr for lr, _ in group.candidates]
        assert lrs == pytest.approx([defaults[group.method] * 0.5, defaults[group.method] * 2.0], rel=1e-5)
        for lr, job in group.candidates:
            budget = "-lora4" if group.budget else ""
            assert job.name == f"shapes/{group.method}{budget}-lr{lr:g}-s3-val"
            assert {"seed=3", f"++method.lr={lr}", "task.data.eval_split=validation", "dataset=shapes",
                    f"method={group.method}"} <= set(job.overrides)


def test_finals_run_the_chosen_lr_at_every_seed_on_test():
    group = TuneGroup(ADAPTERS[0], "lora8", "digits", ())
    jobs = final_jobs(group, [0, 1, 2], 0.004)
    assert [j.name for j in jobs] == [f"digits/{ADAPTERS[0]}-lora8-s{s}" for s in (0, 1, 2)]
    assert all({"++method.lr=0.004", "task.data.eval_split=test"} <= set(j.overrides) for j in jobs)
    assert not any(o.startswith("++method.lr") for o in final_jobs(group, [0], None)[0].overrides)


def candidate(root: Path, name: str, accuracy: float, split: str = "validation", status: str = "success",
              loss: float | None = None) -> Path:
    """A hand-made stage-1 result (with its validation loss, if given)."""
    per = {"shapes": {"accuracy": accuracy, "loss": loss}} if loss is not None else {}
    write_results(root / name, {"run": {"status": status},
                                "metrics": {"accuracy": accuracy, "eval_split": split,
                                            "per_dataset_metrics": per}})
    return root / name


def test_the_validation_winner_is_chosen_never_a_test_score_or_a_failed_run(tmp_path):
    runs = {1e-3: candidate(tmp_path, "a", 0.70), 2e-3: candidate(tmp_path, "b", 0.80),
            4e-3: candidate(tmp_path, "c", 0.95, split="test"),        # the best number, but scored on test
            8e-3: candidate(tmp_path, "d", 0.99, status="failed"),      # diverged after a good start
            1.6e-2: tmp_path / "never-ran"}
    scores = [(lr, candidate_score(path)) for lr, path in runs.items()]
    assert [s for _, s in scores] == [(0.70, None), (0.80, None), None, None, None]
    assert choose_lr(scores) == 2e-3


def test_a_tie_goes_to_the_lower_validation_loss_then_the_smaller_lr(tmp_path):
    # a saturated validation split: three lrs at 100%; the loss tells them apart
    runs = {1e-3: candidate(tmp_path, "a", 1.0, loss=0.30), 2e-3: candidate(tmp_path, "b", 1.0, loss=0.05),
            4e-3: candidate(tmp_path, "c", 1.0, loss=0.10),
            8e-3: candidate(tmp_path, "d", 0.9, loss=0.01)}  # the lowest loss, but a lower score
    scores = [(lr, candidate_score(path)) for lr, path in runs.items()]
    assert scores[1][1] == (1.0, 0.05)
    assert choose_lr(scores) == 2e-3
    # no loss: the smaller lr
    assert choose_lr([(4e-3, (0.8, None)), (1e-3, (0.8, None)), (2e-3, (0.5, None))]) == 1e-3
    assert choose_lr([(4e-3, (0.8, 0.2)), (1e-3, (0.8, None))]) == 1e-3  # a loss compares only with losses
    record = tuning_record(2e-3, [(lr, s, "dir") for lr, s in scores])
    assert record["tie_break"] == "loss"
    assert record["candidates"][1] == {"lr": 2e-3, "score": 1.0, "loss": 0.05, "run_dir": "dir"}


def test_all_failed_chooses_nothing():
    assert choose_lr([(1e-3, None), (2e-3, None)]) is None
    assert choose_lr([(1e-3, None), (2e-3, (0.0, None))]) == 2e-3


@pytest.mark.slow
def test_a_tuned_sweep_runs_the_validation_winner_and_a_rerun_launches_nothing(tmp_path):
    sweep = ["-m", "+sweep=tuned", "task=clip", "sweep.methods=[lora]",
             f"sweep.references=[{REFERENCES[-1]}]", "sweep.seeds=[0,1]", "sweep.lr_factors=[0.5,2]", *TINY,
             f"sweep.root={tmp_path / 'multirun'}"]
    sweep_dir = tmp_path / "multirun" / "tuned" / "clip-tiny"
    dry = run_py([*sweep, "sweep.dry_run=true"], cwd=tmp_path)
    assert dry.returncode == 0 and "stage 1: 2 of 2 runs would launch; stage 2: up to 4 finals" in dry.stdout
    assert not list(tmp_path.rglob("results.json"))

    first = run_py(sweep, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:]
    records = results(sweep_dir)
    stage1 = {name: r for name, r in records.items() if name.endswith("-val")}
    assert len(stage1) == 2 and all(r["metrics"]["eval_split"] == "validation" for r in stage1.values())
    scores = [(r["run"]["lr"], r["metrics"]["accuracy"]) for r in stage1.values()]
    loss = {r["run"]["lr"]: r["metrics"]["per_dataset_metrics"]["shapes"]["loss"] for r in stage1.values()}
    best = max(scores, key=lambda s: (s[1], -loss[s[0]], -s[0]))[0]
    for seed in (0, 1):
        final = records[f"shapes/lora-lora8-s{seed}"]
        assert final["run"]["status"] == "success" and final["metrics"]["eval_split"] == "test"
        assert final["run"]["lr"] == pytest.approx(best)
        tuning = final["run"]["tuning"]
        assert tuning["split"] == "validation" and tuning["chosen_lr"] == pytest.approx(best)
        assert sorted((c["lr"], c["score"]) for c in tuning["candidates"]) == sorted(scores)
        head_only = records[f"shapes/{REFERENCES[-1]}-s{seed}"]
        assert head_only["run"]["tuning"] is None and head_only["metrics"]["eval_split"] == "test"
    assert set(records) == set(stage1) | {f"shapes/{m}-s{s}"
                                          for m in ("lora-lora8", REFERENCES[-1]) for s in (0, 1)}

    before = mtimes(sweep_dir)
    again = run_py(sweep, cwd=tmp_path)
    assert again.returncode == 0
    assert "stage 1 (lr on validation): 2 runs, 2 finished, launching 0" in again.stdout
    assert "stage 2 (winners on test): 4 runs, 4 finished, launching 0" in again.stdout
    assert mtimes(sweep_dir) == before
    written = json.loads((sweep_dir / "shapes" / "lora-lora8-s0" / "tuning.json").read_text())
    assert written["chosen_lr"] == best
