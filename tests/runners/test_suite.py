"""Multi-dataset suites as the papers run them: a fresh adapter per dataset, then the mean."""
import json

import pytest
from rbtest import compose_config

from analysis.load import load_results
from runners.train import RunFailed, run

TWO = "task.data.datasets=[shapes,digits]"


def _read(path):
    return json.loads(path.read_text())


def test_suite_run_trains_one_fresh_adapter_per_dataset(tiny_overrides, tmp_path):
    record = run(compose_config(["method=lora", TWO, *tiny_overrides]))
    out = tmp_path / "run"
    parts = {name: _read(out / name / "results.json") for name in ("shapes", "digits")}
    assert record["run"]["parts"] == {"shapes": "shapes/results.json", "digits": "digits/results.json"}
    for name, part in parts.items():
        assert part["run"]["dataset"] == name and set(part["metrics"]["per_dataset"]) == {name}
        assert (out / name / "adapter").is_dir()
        assert record["metrics"]["per_dataset"][name] == part["metrics"]["per_dataset"][name]
    assert record["metrics"]["accuracy"] == pytest.approx(
        sum(p["metrics"]["per_dataset"][n] for n, p in parts.items()) / 2)
    assert _read(out / "results.json")["run"]["status"] == "success"
    # a fresh adapter per dataset: digits trained inside the suite equals digits trained alone
    alone = run(compose_config(["method=lora", "dataset=digits",
                                *[o for o in tiny_overrides if not o.startswith("out_dir")],
                                f"out_dir={tmp_path / 'alone'}"]))
    assert alone["metrics"]["per_dataset"] == {"digits": parts["digits"]["metrics"]["per_dataset"]["digits"]}
    assert [h["loss"] for h in alone["history"]] == [h["loss"] for h in parts["digits"]["history"]]


def test_an_interrupted_suite_reruns_only_the_missing_datasets(tiny_overrides, tmp_path):
    cfg = compose_config(["method=lora", TWO, *tiny_overrides])
    run(cfg)
    out = tmp_path / "run"
    shapes_before = (out / "shapes" / "results.json").stat().st_mtime_ns
    (out / "results.json").unlink()
    (out / "digits" / "results.json").unlink()
    record = run(cfg)
    assert (out / "shapes" / "results.json").stat().st_mtime_ns == shapes_before  # skipped, not redone
    assert (out / "digits" / "results.json").is_file() and record["run"]["status"] == "success"


def test_a_failing_dataset_does_not_stop_the_others(tiny_overrides, tmp_path):
    # forgetting off: its probe scores every other dataset of the suite, so a broken one fails every run
    # (by design: a partial probe would mix means over different datasets)
    cfg = compose_config(["method=lora", TWO, "+task.data.sources.digits.path=/no/such/folder",
                          "task.forgetting.enabled=false", *tiny_overrides])
    with pytest.raises(RunFailed,
                       match=r"run failed on 1 of 2 datasets of the suite \(digits: FileNotFoundError"):
        run(cfg)
    out = tmp_path / "run"
    assert _read(out / "shapes" / "results.json")["run"]["status"] == "success"
    summary = _read(out / "results.json")
    assert summary["run"]["status"] == "failed" and "digits" in summary["run"]["error"]


def test_the_report_reads_a_suite_once_and_sweep_jobs_as_one_suite(tiny_overrides, tmp_path):
    run(compose_config(["method=lora", TWO, *tiny_overrides]))
    df = load_results(tmp_path / "run")  # summary + its two parts: the parts, combined, not both
    assert sorted(df["dataset"]) == ["digits", "shapes"]
    assert df["source"].nunique() == 1 and df["source"].iloc[0].startswith("suite:")
    assert df["mean_accuracy"].iloc[0] == pytest.approx(df["accuracy"].mean())
    assert df["run_dataset"].isna().all()


def test_the_report_reads_the_lr_the_run_used(tiny_overrides, tmp_path):
    """trainer.lr (5e-3 on the tiny CLIP) is not RandLoRA's lr: the run records its own (run.lr)."""
    record = run(compose_config(["method=randlora", "dataset=shapes", *tiny_overrides]))
    df = load_results(tmp_path / "run")
    assert record["run"]["lr"] == 1e-3 and df["lr"].iloc[0] == 1e-3


def test_tuned_sweep_finals_with_each_datasets_own_lr_form_one_suite(tiny_overrides, tmp_path):
    """+sweep=tuned chooses the lr per dataset: its finals (run.tuning set) combine into one suite run whose
    lr is none (each part keeps its own); runs at different lrs that no tuning chose stay apart."""
    from runners.record.results import TUNING_FILE

    base = [o for o in tiny_overrides if not o.startswith("out_dir")]
    for tuned in (True, False):
        for dataset, lr in (("shapes", 0.002), ("digits", 0.004)):
            out = tmp_path / str(tuned) / dataset
            if tuned:
                out.mkdir(parents=True)
                (out / TUNING_FILE).write_text(json.dumps({"metric": "accuracy", "split": "validation",
                                                           "chosen_lr": lr, "candidates": []}))
            run(compose_config(["method=lora", f"dataset={dataset}", f"++method.lr={lr}", *base,
                                f"out_dir={out}"]))
    df = load_results(tmp_path / "True")
    assert df["source"].nunique() == 1 and sorted(df["dataset"]) == ["digits", "shapes"]
    assert df["lr"].isna().all() and df["mean_accuracy"].iloc[0] == pytest.approx(df["accuracy"].mean())
    apart = load_results(tmp_path / "False")
    assert apart["source"].nunique() == 2 and sorted(apart["lr"]) == [0.002, 0.004]
