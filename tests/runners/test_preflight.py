"""`python -m runners.preflight`: a whole suite checked from metadata, every problem listed at once."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from paperstandins import clip_model, curated, hub_facts, hub_standin, image_dataset
from rbtest import ROOT, compose_config

import methods
from runners import preflight
from runners.sweeps import launch_check
from tasks.sources import source_config


@pytest.fixture(scope="module")
def copies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("preflight")
    facts = hub_facts("clip22")  # shaped as the hub copies publish them (tests/fixtures/hub/clip22.json)
    copies = {name: hub_standin(root / name, name, facts[name], rows=n)
              for name, n in (("cars", 196), ("cifar100", 100), ("country211", 211))}
    # dtd with an image column the config does not name: the problem the preflight must report
    copies["dtd"] = image_dataset(root / "dtd", curated("dtd"), {"train": 47, "test": 47},
                                  image_column="picture")
    return {"clip": clip_model(root / "clip"), **copies}


def _overrides(copies: dict[str, Path], *names: str) -> list[str]:
    local = [f"task.data.sources.{n}.path={copies[n]}" for n in names if n in copies]
    return ["task=clip", "size=base", f"task.model.path={copies['clip']}",
            f"task.data.datasets=[{','.join(names)}]", *local]


def test_a_suite_is_checked_from_metadata_with_every_problem_listed(copies, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose_config(_overrides(copies, "cars", "cifar100", "country211", "dtd", "gtsrb", "ucf101"))
    records = {r.dataset: r for r in launch_check.check_suite(cfg, ["lora8"])}
    cars = records["cars"]
    assert cars.splits == {"train": 196, "test": 196} and cars.num_classes == 196 and not cars.problems
    assert cars.prompts[0] == "An image of AM General Hummer SUV 2000"  # the official training/eval prompt
    hub_cifar = [c if c != "crab" else "cra" for c in curated("cifar100")]
    assert records["cifar100"].classes[hub_cifar.index("cra")] == "crab"
    assert records["country211"].classes[:1] == ["Andorra"] and not records["country211"].problems
    assert records["dtd"].problems == [
        "no column 'image' (has picture, label); set task.data.sources.dtd.image_column"]
    gtsrb = records["gtsrb"].problems[0]
    assert "hub unreachable" in gtsrb and "tanganke/gtsrb" in gtsrb
    assert records["ucf101"].problems == [
        "no path: no verified public copy is configured; set task.data.sources.ucf101.path=<folder or file>"]
    model = cars.model
    assert model["problems"] == [] and model["targets"] == ["fc1", "fc2", "k_proj", "q_proj", "v_proj"]
    assert model["target_layers"] == 2 * 2 * 5  # two towers x two layers x five targets (the stand-in)
    lora = model["counts"]["lora"]["lora8"]
    assert lora["achieved"] == lora["target"] and lora["hp"]["r"] == 8
    skeleton = launch_check._skeleton(str(copies["clip"]), cfg.task)
    assert next(skeleton.parameters()).is_meta  # shapes only: nothing allocated, nothing downloaded
    for method in methods.available():
        count = model["counts"][method]["lora8"]
        if "problem" in count:  # a structure that cannot reach lora8 here (VeRA: r + out per layer)
            assert re.search("above the largest count|has no size knob", count["problem"])   # VeRA; IA3
            continue
        targets = list(cfg.task.model.target_modules)
        assert count["achieved"] == methods.num_params_model(skeleton, method, targets, **count["hp"])
    assert len(launch_check.problems(list(records.values()))) == 3


def test_a_script_based_hub_repo_is_named_as_such(monkeypatch):
    monkeypatch.setattr(launch_check, "_repo_files",
                        lambda path: ["imagenet-1k.py", "README.md", "classes.py"])
    cfg = compose_config(["task=clip", "size=base"])
    src = source_config(cfg.task.data, "imagenet")
    src.path = "ILSVRC/imagenet-1k"
    record = launch_check.check_dataset("imagenet", src, cfg.task)
    assert record.problems == [("ILSVRC/imagenet-1k ships a loading script (imagenet-1k.py), which "
                                "datasets>=4 refuses: use a parquet/webdataset copy")]


def test_cli_prints_one_table_writes_json_and_exits_nonzero_on_problems(copies, tmp_path):
    out = tmp_path / "preflight.json"
    proc = subprocess.run([sys.executable, "-m", "runners.preflight", *_overrides(copies, "cars", "ucf101"),
                           "preflight.budgets=[lora4]", f"preflight.out={out}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "1 problem(s):" in proc.stdout and "ucf101: no path" in proc.stdout
    assert proc.stdout.splitlines()[0].split()[:4] == ["dataset", "source", "splits", "classes"]
    saved = json.loads(out.read_text())
    assert [r["dataset"] for r in saved] == ["cars", "ucf101"]
    assert {"dataset", "source", "splits", "num_classes", "classes", "prompts", "problems"} <= set(saved[0])
    assert saved[0]["splits"] == {"train": 196, "test": 196} and len(saved[0]["classes"]) == 196
    assert list(saved[0]["model"]["counts"]["lora"]) == ["lora4"]


def test_a_clean_suite_exits_zero(copies):
    proc = subprocess.run([sys.executable, "-m", "runners.preflight", *_overrides(copies, "cars"),
                           "preflight.budgets=[lora4]"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0 and "0 problem(s): ready to launch" in proc.stdout, proc.stdout + proc.stderr


def test_facts_no_source_confirms_are_printed():
    """conf/task/commonsense/base.yaml notes that HellaSwag's size and option labels could not be checked
    against its missing file: the preflight report says so; a task without notes adds nothing."""
    lines = preflight.unchecked_facts(compose_config(["task=commonsense", "size=base"]))
    assert len(lines) == 1 and lines[0].startswith("not checked against a public source")
    assert "hellaswag: dataset/hellaswag/test.json is missing" in lines[0]
    assert preflight.unchecked_facts(compose_config(["task=clip"])) == []


def test_a_shared_training_file_is_checked_before_the_evaluation_sets():
    """Commonsense trains on one instruction file for all eight benchmarks (Task.train_source): the
    preflight checks it as the first record, under its own config key."""
    records = launch_check.check_suite(compose_config(["task=commonsense", "size=base", "dataset=boolq"]),
                                       ["lora8"])
    assert [r.dataset for r in records] == ["train", "boolq"]
    assert records[0].problems == ["no path: no verified public copy is configured; "
                                   "set task.data.train.path=<folder or file>"]


@pytest.mark.parametrize("bad", ["dataset=nosuch",   # two subprocesses a case: the others are slow tests
                                 pytest.param("task=clpi", marks=pytest.mark.slow),
                                 pytest.param("trainer.lr=-1", marks=pytest.mark.slow)])
def test_the_preflights_bad_input_is_the_one_line_run_py_gives(bad, tmp_path):
    """`python -m runners.preflight task=clip dataset=nosuch` ends as `python run.py` does: one line,
    exit 1."""
    def stderr_lines(*cmd: str) -> tuple[int, list[str]]:
        proc = subprocess.run([sys.executable, *cmd, "task=clip", bad], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120, check=False)
        return proc.returncode, [line for line in proc.stderr.splitlines() if line.strip()]

    code, lines = stderr_lines("-m", "runners.preflight")
    run_code, run_lines = stderr_lines(str(ROOT / "run.py"))
    assert code != 0 and run_code != 0
    assert len(lines) == 1 and lines == run_lines and lines[0].startswith("rankbench: "), lines


@pytest.mark.parametrize("choice, prompts", [
    ("dataset", ["a photo of a AM General Hummer SUV 2000.", "a photo of a Acura RL Sedan 2012."]),
    ("{} on a road", ["AM General Hummer SUV 2000 on a road", "Acura RL Sedan 2012 on a road"]),
    ("bogus", []),
])
def test_the_shown_prompts_are_the_ones_evaluation_uses(copies, choice, prompts):
    cfg = compose_config([*_overrides(copies, "cars"), f"task.objective.prompts.eval='{choice}'"])
    cars = launch_check.check_dataset("cars", source_config(cfg.task.data, "cars"), cfg.task)
    assert cars.prompts[:2] == prompts
    assert cars.problems == ([] if prompts else
                             ["prompt 'bogus' is neither 'ensemble', 'dataset' nor a template with {}"])
