"""Sweep expansion, validation and the sweep configs themselves: pure and fast (no training)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import methods
from runners.engine.optimizer import method_lr
from runners.sweeps.sweeper import (
    Job,
    SweepError,
    _with_suffix,
    already_done,
    config_diff,
    expand,
    factor_axes,
    override_keys,
    registered_methods,
    resolve_methods,
    validate,
)

CONF = Path(__file__).resolve().parents[2] / "conf"
ADAPTERS, REFERENCES = registered_methods()   # the registry, never a list here


def sweep_config(name: str, *overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"+sweep={name}", *overrides], return_hydra_config=True)


def spec(name: str, *overrides: str) -> dict:
    """The sweep node as the sweeper resolves it: `all` -> the registry, hp_factors -> per-method axes
    from each method's composed config (what RankbenchSweeper._validate does)."""
    out = resolve_methods(OmegaConf.to_container(sweep_config(name, *overrides).sweep, resolve=True),
                          ADAPTERS, REFERENCES)
    defaults = {m: method_defaults(m, list(out.get("hp_factors") or {}), *overrides)
                for m in out["methods"] + out["references"]}
    return {**out, "hp": factor_axes(out, defaults)}


def method_defaults(method: str, keys: list[str], *overrides: str) -> dict:
    cfg = sweep_config("budget", *overrides, f"method={method}")
    return {k: method_lr(cfg) if k == "lr" else cfg.method.get(k) for k in keys}


def test_sweeps_default_to_every_registered_adapter():
    for name in ("budget", "lr", "ranks"):
        raw = OmegaConf.to_container(sweep_config(name).sweep, resolve=True)
        assert raw["methods"] == "all" and spec(name)["methods"] == sorted(methods.available())
    made_up = resolve_methods({"methods": "all", "references": ["full"]}, ["lora", "newmethod"], REFERENCES)
    assert made_up["methods"] == ["lora", "newmethod"] and made_up["references"] == ["full"]
    assert resolve_methods({"methods": ["lora"], "references": "all"}, ADAPTERS, REFERENCES) == {
        "methods": ["lora"], "references": REFERENCES}


def test_budget_sweep_is_methods_x_budgets_x_seeds_plus_references_once_per_seed():
    budget = spec("budget")
    jobs = expand(budget)
    assert len(jobs) == 3 * (len(ADAPTERS) * len(budget["budgets"]) + 2) and "lora16" in budget["budgets"]
    names = [j.name for j in jobs]
    assert len(set(names)) == len(names)
    assert "lokr-lora16-s2" in names and "full-s0" in names and "none-s1" in names
    lora8 = next(j for j in jobs if j.name == "lora-lora8-s1")
    assert lora8.overrides == ("method=lora", "budget=lora8", "seed=1")
    assert next(j for j in jobs if j.name == "full-s0").overrides == ("method=full", "budget=null", "seed=0")


def test_a_suite_sweep_is_one_job_per_dataset_with_its_own_directory():
    """The papers train a fresh adapter per dataset: the sweeper adds the task's suite as an axis."""
    from runners.engine.suite import sweep_datasets

    cfg = sweep_config("budget", "task=clip", "sweep.methods=[lora]", "sweep.budgets=[lora8]",
                       "sweep.seeds=[0]", "sweep.references=[full]")
    datasets = sweep_datasets(cfg)
    assert datasets == list(cfg.task.data.datasets) and len(datasets) == 5
    jobs = expand({**OmegaConf.to_container(cfg.sweep, resolve=True), "datasets": datasets})
    assert [j.name for j in jobs][:2] == ["shapes/lora-lora8-s0", "shapes/full-s0"]
    assert len(jobs) == 2 * len(datasets) and len({j.name for j in jobs}) == len(jobs)
    assert jobs[0].overrides == ("method=lora", "budget=lora8", "seed=0", "dataset=shapes")
    assert sweep_datasets(sweep_config("budget", "task=clip", "dataset=digits")) == ["digits"]


def test_command_line_narrows_every_axis():
    jobs = expand(spec("budget", "sweep.methods=[lora,randlora]", "sweep.budgets=[lora4,lora8]",
                       "sweep.seeds=[0]", "sweep.references=[]"))
    assert [j.name for j in jobs] == ["lora-lora4-s0", "lora-lora8-s0", "randlora-lora4-s0",
                                      "randlora-lora8-s0"]


def test_ranks_sweep_uses_each_methods_own_knob_without_budget():
    jobs = expand(spec("ranks", "sweep.seeds=[0]", "++sweep.hp.lora.r=[4,8]"))
    lora = [j for j in jobs if j.name.startswith("lora-")]
    assert [j.name for j in lora] == ["lora-r4-s0", "lora-r8-s0"]   # an explicit axis wins
    assert lora[0].overrides == ("method=lora", "budget=null", "seed=0", "++method.r=4")
    assert {j.name.split("-")[0] for j in jobs} == set(ADAPTERS + REFERENCES)
    for method in ADAPTERS:   # every other method: multiples of its own configured r
        if method != "lora":
            r = method_defaults(method, ["r"])["r"]
            runs = [j.name for j in jobs if j.name.split("-")[0] == method]
            if r is None:   # no size knob (IA3): one run at its own count
                assert runs == [f"{method}-s0"]
                continue
            expected = sorted({max(1, round(r * f)) for f in (0.125, 0.25, 0.5, 1, 2)})
            assert runs == [f"{method}-r{x}-s0" for x in expected]
    assert [j.name for j in jobs if j.name.startswith("full-")] == ["full-s0"]   # no r: one run


def test_lr_sweep_gives_each_method_its_own_learning_rates():
    jobs = expand(spec("lr", "task=clip"))
    for method in [*ADAPTERS, "full"]:
        default = method_defaults(method, ["lr"], "task=clip")["lr"]
        grid = sorted({float(f"{default * f:.6g}") for f in (0.25, 0.5, 1.0, 2.0, 4.0)})
        runs = [j for j in jobs if j.name.split("-")[0] == method]
        assert [next(o for o in j.overrides if o.startswith("++method.lr=")) for j in runs] == [
            f"++method.lr={lr}" for lr in grid]
    assert len({method_defaults(m, ["lr"], "task=clip")["lr"] for m in ("lora", "randlora")}) == 2
    randlora = [j for j in jobs if j.name.startswith("randlora-")]
    assert randlora[2].name == f"randlora-lora8-lr{method_defaults('randlora', ['lr'], 'task=clip')['lr']}-s0"
    assert all("budget=null" in j.overrides for j in jobs if j.name.startswith("full-"))


def test_hp_factors_scale_each_methods_default_and_skip_methods_without_it():
    hp = factor_axes({"hp": {"lora": {"r": [3]}}, "hp_factors": {"r": [0.5, 1, 2], "lr": [1, 10]}},
                     {"lora": {"r": 8, "lr": 1e-3}, "newmethod": {"r": 1, "lr": 0.02},
                      "full": {"r": None, "lr": 1e-4}})
    assert hp == {"lora": {"r": [3], "lr": [0.001, 0.01]}, "newmethod": {"r": [1, 2], "lr": [0.02, 0.2]},
                  "full": {"lr": [0.0001, 0.001]}}


@pytest.mark.parametrize("sweep", ["budget", "ranks", "lr"])
def test_sweep_configs_select_the_sweeper_and_a_deterministic_dir(sweep):
    cfg = sweep_config(sweep, "task=clip", "size=tiny")
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.rankbench_sweeper.RankbenchSweeper"
    assert cfg.hydra.sweep.dir == f"multirun/{sweep}/clip-tiny"
    assert cfg.logger.group == f"{sweep}-clip-tiny"
    raw = resolve_methods(OmegaConf.to_container(cfg.sweep, resolve=True), ADAPTERS, REFERENCES)
    validate(raw, ADAPTERS, REFERENCES, ADAPTERS + REFERENCES)


def test_slurm_launcher_config_has_the_cluster_keys():
    launcher = sweep_config("budget", "hydra/launcher=slurm").hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    for key in ("partition", "account", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min",
                "array_parallelism", "max_num_timeout", "signal_delay_s"):
        assert key in launcher, key
    assert launcher.max_num_timeout > 0 and launcher.timeout_min >= 60
    assert launcher.additional_parameters.requeue is True
    for gpus, tasks in (("4", 4), ("null", 1), ("0", 1)):  # one DDP process per GPU; one on a CPU job
        cfg = sweep_config("budget", "hydra/launcher=slurm", f"hydra.launcher.gpus_per_node={gpus}")
        assert cfg.hydra.launcher.tasks_per_node == tasks
    for name in ("submitit_local", "local"):
        launcher = sweep_config("budget", f"hydra/launcher={name}").hydra.launcher
        assert launcher._target_.endswith("LocalLauncher")


def test_the_registry_is_what_validation_checks_against():
    adapters, references = registered_methods()
    assert set(ADAPTERS) <= set(adapters) and references == REFERENCES


@pytest.mark.parametrize("bad, message", [
    ({"methods": ["lora", "lroa"]}, "unknown method 'lroa' in sweep.methods; valid: " + ", ".join(ADAPTERS)),
    ({"methods": "lora"}, "sweep.methods must be a list or all"),
    ({"hp_factors": {"lr": [0, 1]}}, "sweep.hp_factors.lr must be a list of positive numbers"),
    ({"hp_factors": {"r": "2"}}, "sweep.hp_factors.r must be a list of positive numbers"),
    ({"references": ["ful"]}, "unknown method 'ful' in sweep.references; valid: full, none"),
    ({"methods": ["lora"], "hp": {"lroa": {"r": [1]}}}, "unknown method 'lroa' in sweep.hp"),
    ({"methods": [], "references": []}, "the sweep is empty"),
])
def test_bad_axes_are_one_clear_line(bad, message):
    base = {"name": "budget", "methods": ["lora"], "budgets": ["lora4"], "seeds": [0], "references": []}
    with pytest.raises(SweepError) as err:
        validate({**base, **bad}, ADAPTERS, REFERENCES, ADAPTERS + REFERENCES)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_method_without_config_file_is_rejected():
    with pytest.raises(SweepError, match=r"no conf/method/lora\.yaml"):
        validate({"methods": ["lora"], "seeds": [0]}, ADAPTERS, REFERENCES, ["loha"])


def test_command_line_sweeps_multiply_jobs_and_name_their_dirs():
    base_jobs = [["task=clip", "trainer.lr=0.1"], ["task=clip", "trainer.lr=0.2"]]
    assert _with_suffix("lora-lora4-s0", base_jobs[1], base_jobs) == "lora-lora4-s0,trainer.lr=0.2"
    assert _with_suffix("lora-lora4-s0", ["task=clip"], [["task=clip"]]) == "lora-lora4-s0"


def write_result(run_dir: Path, status: str, config: dict) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps({"run": {"status": status, "config": config}}))


def test_only_a_successful_result_of_the_same_config_counts_as_done(tmp_path):
    config = {"seed": 0, "trainer": {"max_steps": 4}, "logger": {"name": "none"}, "sweep": {"seeds": [0]}}
    write_result(tmp_path / "ok", "success", config)
    write_result(tmp_path / "failed", "failed", config)
    assert already_done(tmp_path / "ok", config)
    assert already_done(tmp_path / "ok", {**config, "logger": {"name": "wandb"}, "sweep": {"seeds": [0, 1]}})
    assert not already_done(tmp_path / "failed", config)
    assert not already_done(tmp_path / "missing", config)
    with pytest.raises(SweepError, match=r"different config \(trainer.max_steps: 4 -> 150\)"):
        already_done(tmp_path / "ok", {**config, "trainer": {"max_steps": 150}})


def test_config_diff_names_dotted_keys():
    assert config_diff({"a": {"b": 1}, "c": 2}, {"a": {"b": 2}, "c": 2}) == ["a.b: 1 -> 2"]
    assert config_diff({"logger": 1}, {"logger": 2}) == []


def test_job_is_hashable_and_frozen():
    job = Job("lora-s0", ("method=lora",))
    assert {job: 1}[Job("lora-s0", ("method=lora",))] == 1


def test_pairs_a_structure_cannot_reach_are_not_launched():
    """VeRA (r + out per layer) stays below lora1 and LoKr's largest count on the tiny CLIP's 128-wide
    layers is below lora32: the sweep drops exactly those pairs (each a log line), nothing else."""
    from runners.sweeps.presubmit import unreachable_pairs

    s = spec("budget", "task=clip", "sweep.budgets=[lora1,lora32]")
    pairs = set(unreachable_pairs(sweep_config("budget", "task=clip"), s))
    assert ("lokr", "lora32") in pairs and ("vera", "lora1") in pairs and ("lora", "lora1") not in pairs
    names = {j.name.rsplit("-s", 1)[0] for j in expand({**s, "seeds": [0], "unreachable": sorted(pairs)})}
    assert "lokr-lora32" not in names and "lokr-lora1" in names and "lora-lora32" in names
    assert len(names) == 2 * len(s["methods"]) - len(pairs) + len(s["references"])


@pytest.mark.parametrize("overrides, mixed", [
    ([], True),                                            # 1 GPU per job, no constraint: any GPU type
    (["hydra.launcher.constraint=h100"], False),
    (["hydra.launcher.gpus_per_node=0"], False),           # CPU jobs
    (["hydra.launcher.gpus_per_node=null"], False),
])
def test_a_slurm_sweep_with_gpus_must_pin_one_gpu_type(overrides, mixed):
    from runners.sweeps.presubmit import mixed_gpu_problem

    launcher = sweep_config("budget", "hydra/launcher=slurm", *overrides).hydra.launcher
    assert (mixed_gpu_problem(launcher) is not None) is mixed
    assert mixed_gpu_problem(sweep_config("budget", "hydra/launcher=submitit_local").hydra.launcher) is None
    assert sweep_config("budget").hydra.sweeper.mixed_gpu_types is False  # the default refuses mixing


def test_a_key_declared_after_a_stored_run_differs_only_where_the_job_overrides_it(tmp_path):
    # the stored run was made before task.data.shots was declared (its default then and now: null)
    stored = {"task": {"data": {"seed": 0}}, "method": {"name": "lora", "r": 8}}
    now = {"task": {"data": {"seed": 0, "shots": None}}, "method": {"name": "lora", "r": 8}}
    write_result(tmp_path / "old", "success", stored)
    assert already_done(tmp_path / "old", now, override_keys(["task=clip", "method=lora", "+sweep=tuned"]))
    with pytest.raises(SweepError, match=r"task.data.shots: '<absent>' -> 4"):
        already_done(tmp_path / "old", {**now, "task": {"data": {"seed": 0, "shots": 4}}},
                     override_keys(["task.data.shots=4"]))
    # a changed value of a key the stored run has is a difference whether overridden or not
    assert config_diff(stored, {**now, "method": {"name": "lora", "r": 4}}) == ["method.r: 8 -> 4"]
    assert override_keys(["+a.b=1", "~c", "++d.e=[1,2]", "task=clip"]) == ["a.b", "c", "d.e", "task"]
