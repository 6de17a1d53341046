"""End-to-end runs of the real configs: every method x task, determinism, failures, bad input."""
import contextlib
import json
import math
from pathlib import Path

import pytest
import torch
from rbtest import NATIVE_METHODS, ROOT, compose_config, run_cli

import methods
from runners.engine.adapt import method_names
from runners.engine.config import check_values
from runners.record.logger import offline_run_info, offline_summary, wait_until_written
from runners.train import RunFailed, run

TASKS = ["clip", "vision", "language"]
METHODS = method_names()  # every registered adapter and the references (full, none)
# Every method on every task. A language suite (MiniLM, 3 datasets) takes 10-20 s a method on 2 cores, so
# beyond LoRA's those run with the slow tests; so do the clip runs of the PEFT-backed methods (8-25 s each;
# their layers are PEFT's code, which the vision suite runs by default).
FAST = {("language", "lora"), *(("clip", m) for m in [*NATIVE_METHODS, "full", "none"]),
        *(("vision", m) for m in METHODS)}
SMOKE = [pytest.param(m, t, marks=[] if (t, m) in FAST else [pytest.mark.slow])
         for t in TASKS for m in METHODS]
# two datasets of each suite: a suite run (one adapter per dataset, the mean, forgetting on the other) at
# 2/5 of the tiny clip suite's cost; tests/runners/test_suite.py runs whole suites
SMOKE_SUITES = {"clip": "[shapes,digits]", "vision": "[shapes,digits]", "language": "[sentiment,topic]"}
CLIP_PAIR = f"task.data.datasets={SMOKE_SUITES['clip']}"   # the default task=clip as a two-dataset suite
SMALL_DATA = ["task.data.train_size=64", "task.data.test_size=32", "trainer.batch_size=16"]


def test_method_configs_match_the_registry():
    conf = Path(__file__).resolve().parents[2] / "conf" / "method"
    assert sorted(p.stem for p in conf.glob("*.yaml")) == sorted(method_names())


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_and_task_composes(method, task):
    cfg = compose_config([f"method={method}", f"task={task}"])
    assert cfg.method.name == method and cfg.task.name == task
    assert cfg.task.model.target_modules


@pytest.mark.parametrize("method, task", SMOKE)
def test_smoke_run_writes_a_complete_result(method, task, tiny_overrides, tmp_path):
    record = run(compose_config([f"method={method}", f"task={task}", *tiny_overrides,
                                 f"task.data.datasets={SMOKE_SUITES[task]}"]))
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["run"]["status"] == "success" and saved["run"]["error"] is None
    assert saved["metrics"]["accuracy"] == record["metrics"]["accuracy"]
    assert set(saved["metrics"]["per_dataset"]) == set(saved["metrics"]["per_dataset_before"])
    assert set(saved["metrics"]["eval_examples"]) == set(saved["metrics"]["per_dataset"])
    assert 0.0 <= saved["metrics"]["accuracy"] <= 1.0
    assert saved["run"]["config"]["method"]["name"] == method and saved["run"]["versions"]["torch"]
    assert "peak_rss_bytes" in saved["cost"] and "peak_mem_bytes" not in saved["cost"]
    assert saved["run"]["gpu"] is None  # CPU run
    trains_something = saved["params"]["trainable"] + saved["params"]["head_trainable"] > 0
    assert (saved["cost"]["step_time_s"] is not None) == trains_something
    assert (saved["params"]["adapter_file_bytes"] > 0) == (method not in ("full", "none"))


def test_same_seed_gives_identical_metrics(tiny_overrides, tmp_path):
    first = run(compose_config(["method=lora", *tiny_overrides, CLIP_PAIR]))
    again = f"out_dir={tmp_path / 'again'}"
    second = run(compose_config(["method=lora", *tiny_overrides[1:], CLIP_PAIR, again]))
    assert first["metrics"]["per_dataset"] == second["metrics"]["per_dataset"]
    assert [h["loss"] for h in first["history"]] == [h["loss"] for h in second["history"]]


def test_budget_is_solved_and_recorded(tiny_overrides):
    record = run(compose_config(["method=loha", "budget=lora4", *tiny_overrides, CLIP_PAIR]))
    params = record["params"]
    assert params["budget_target"] > 0
    assert abs(params["trainable"] - params["budget_target"]) / params["budget_target"] == pytest.approx(
        abs(params["budget_error"]))
    assert record["run"]["hp"]["r"] >= 1


@pytest.mark.parametrize("budget_alpha, expected_ratio", [("ratio", 20.0), ("fixed", None)])
def test_budget_keeps_the_configured_scaling(budget_alpha, expected_ratio, tiny_overrides):
    record = run(compose_config(["method=randlora", "budget=lora8", f"budget_alpha={budget_alpha}",
                                 *tiny_overrides, CLIP_PAIR]))
    hp = record["run"]["hp"]
    assert hp["r"] != 32  # the solver moved r away from the config's 32
    if expected_ratio is None:
        assert hp["alpha"] == 640
    else:
        assert hp["alpha"] / hp["r"] == pytest.approx(expected_ratio)


def test_completed_run_is_skipped_not_overwritten(tiny_overrides, tmp_path):
    run(compose_config(["method=lora", *tiny_overrides, CLIP_PAIR]))
    path = tmp_path / "run" / "results.json"
    before = path.read_text()
    run(compose_config(["method=lora", *tiny_overrides, CLIP_PAIR]))
    assert path.read_text() == before


@pytest.mark.slow
def test_diverging_run_writes_failed_result_and_exits_nonzero(tmp_path):
    out = tmp_path / "nan"
    proc = run_cli(["method=lora", "trainer.lr=1e30", "trainer.max_steps=6", "trainer.warmup_steps=1",
                    "logger=none", f"out_dir={out}", *SMALL_DATA], cwd=tmp_path)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "run failed" in line]
    assert len(errors) == 1 and "loss is" in errors[0] and "Traceback" not in proc.stderr
    saved = json.loads((out / "results.json").read_text())
    assert saved["run"]["status"] == "failed" and "loss is" in saved["run"]["error"]


BAD_VALUES = [  # (override, the one line run.py prints)
    ("trainer.lr=-1", "trainer.lr=-1 is not valid: use a number > 0, e.g. trainer.lr=1e-3"),
    ("trainer.lr=0", "trainer.lr=0 is not valid: use a number > 0"),
    ("trainer.grad_accum=0", "trainer.grad_accum=0 is not valid: use an integer >= 1"),
    ("trainer.batch_size=0", "trainer.batch_size=0 is not valid: use an integer >= 1"),
    ("trainer.max_steps=-3", "trainer.max_steps=-3 is not valid: use an integer >= 0 (0: evaluate only)"),
    ("seed=abc", "seed=abc is not valid: use an integer, e.g. seed=0"),
    ("dataset=nosuch", "dataset=nosuch is not valid: task clip (size=tiny) has shapes, colors, digits, "
                       "textures, counts; name one of them, or null for the whole suite"),
    ("trainer.strategy=zero3",
     "trainer.strategy=zero3 is not valid: use ddp (replicas) or fsdp (sharded, FSDP2)"),
    ("trainer.on_bad_checkpoint=delete", "trainer.on_bad_checkpoint=delete is not valid: use restart"),
    ("plan.over=ignore", "plan.over=ignore is not valid: use refuse (stop the sweep) or skip"),
]


@pytest.mark.parametrize("args, expected", [
    (["method=lorra"], "unknown method 'lorra'; valid: "
                       + ", ".join(sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml")))),
    (["task=clpi"], "unknown task 'clpi'; valid: clip, "),
    (["size=huge"], "unknown size 'huge'; valid: base, large, tiny"),
    (["trainer.max_step=5"], "unknown config key 'trainer.max_step'"),
    *(([arg], f"rankbench: {line}") for arg, line in BAD_VALUES),
])
def test_bad_command_line_is_one_clear_line(args, expected, tmp_path):
    finished = tmp_path / "finished"  # a finished run's directory: a refused command line leaves it alone
    finished.mkdir()
    (finished / "results.json").write_text('{"run": {"status": "success"}}')
    proc = run_cli([*args, f"out_dir={finished}"], cwd=tmp_path, timeout=60)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert not (tmp_path / "outputs").exists()
    assert (finished / "results.json").read_text() == '{"run": {"status": "success"}}'


@pytest.mark.parametrize("arg, _", BAD_VALUES)
def test_bad_values_are_refused_in_process_before_anything_is_written(arg, _, tiny_overrides, tmp_path):
    with pytest.raises(RunFailed, match=rf"^{arg.split('=')[0]}=.* is not valid: "):
        run(compose_config([*tiny_overrides, arg]))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("arg", ["trainer.max_steps=0", "trainer.max_steps=null", "seed=-1", "trainer.lr=1",
                                 "trainer.grad_clip=null", "+method.lr=2e-4"])
def test_valid_edge_values_pass_the_check(arg):
    assert check_values(compose_config([arg])) is None  # max_steps=0: evaluate only


@pytest.mark.parametrize("args, expected", [
    (["budget=10"], "budget 10 is below the smallest count lora can achieve on these targets: "),
    (["budget=100000000"], "budget 100000000 is above the largest count lora can achieve on these targets: "),
    (["task=vision", "method.r=100000"],  # 128-wide layers: once wrapped 1.43B parameters and hung
     "lora: r=100000 is too large for Linear(128, 128) ('backbone.encoder.layers.0.self_attn."),
])
def test_unreachable_budget_or_rank_fails_naming_what_is_valid(args, expected, tmp_path):
    out = tmp_path / "refused"
    proc = run_cli(["method=lora", *args, "dataset=shapes", "logger=none", f"out_dir={out}", *SMALL_DATA],
                   cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    line = [x for x in proc.stderr.splitlines() if "run failed" in x]
    assert len(line) == 1 and expected in line[0], proc.stderr
    saved = json.loads((out / "results.json").read_text())
    assert saved["run"]["status"] == "failed" and saved["history"] == [] and saved["cost"] == {}


def test_wandb_offline_run_holds_the_summary(tiny_overrides, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    overrides = [o for o in tiny_overrides if o != "logger=none"] + ["logger=wandb"]
    record = run(compose_config(["method=lora", *overrides, CLIP_PAIR]))
    files = [wait_until_written(f)  # one W&B run per dataset
             for f in (tmp_path / "run").glob("*/wandb/offline-run-*/run-*.wandb")]
    assert len(files) == len(record["metrics"]["per_dataset"])
    summary = offline_summary(min(files))
    first = min(record["run"]["parts"])
    assert summary["metrics/accuracy"] == pytest.approx(record["metrics"]["per_dataset"][first])
    assert summary["params/trainable"] == record["params"]["trainable"]
    runs = [offline_run_info(f) for f in files]  # named by dataset, grouped by the suite
    names = [f"{d}-lora-nobudget-s0" for d in sorted(record["run"]["parts"])]
    assert sorted(r["name"] for r in runs) == names
    assert {r["group"] for r in runs} == {record["run"]["id"]}
    [suite] = [wait_until_written(f) for f in (tmp_path / "run").glob("wandb/offline-run-*/run-*.wandb")]
    assert offline_run_info(suite)["group"] == record["run"]["id"]
    assert offline_summary(suite)["metrics/accuracy"] == pytest.approx(record["metrics"]["accuracy"])


def test_run_failed_is_raised_in_process(tiny_overrides):
    with pytest.raises(RunFailed, match=r"unknown method|lorra"):
        cfg = compose_config(["method=lora", *tiny_overrides])
        cfg.method.name = "lorra"
        run(cfg)


@pytest.mark.parametrize("method", methods.available())
def test_bf16_autocast_training_runs_every_adapter(method, tiny_overrides, monkeypatch):
    """GPU runs train under bf16 autocast (`trainer.bf16`, CUDA only): the same loop under CPU autocast
    must train every adapter (their fp32 parameters get fp32 gradients) and evaluate."""
    import runners.train as train_module

    monkeypatch.setattr(train_module, "autocast", lambda device, bf16: (
        torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()))
    record = run(compose_config([f"method={method}", "task=clip", "dataset=shapes", "trainer.bf16=true",
                                 *tiny_overrides]))
    assert record["run"]["status"] == "success", record["run"]["error"]
    assert all(math.isfinite(h["loss"]) for h in record["history"])
    assert 0.0 <= record["metrics"]["accuracy"] <= 1.0


def test_cost_has_device_independent_memory_figures(tiny_overrides):
    """`activation_bytes` and `state_bytes` on every device (their arithmetic:
    tests/runners/test_metrics.py)."""
    record = run(compose_config(["method=lora", "dataset=shapes", *tiny_overrides]))
    cost, params = record["cost"], record["params"]
    assert cost["activation_bytes"] > 0
    trainable = params["trainable"] + params["head_trainable"]
    counters = cost["state_bytes"] - 16 * trainable  # fp32 AdamW: weight, gradient and two moments
    assert counters > 0 and counters % 4 == 0  # plus one 4-byte step counter per trainable tensor


def test_bf16_base_update_rank_is_the_adapters_rank(tiny_overrides):
    """W + dW formed in bf16 turned a rank-4 LoRA update into rank ~128 of 128; dW is now measured in fp32."""
    record = run(compose_config(["method=lora", "method.r=4", "task.model.dtype=bfloat16", "dataset=shapes",
                                 *tiny_overrides]))
    ranks = record["metrics"]["delta_rank"]
    assert ranks and all(1 <= v["rank"] <= 4 and v["max_rank"] == 128 for v in ranks.values()), ranks


class Killed(BaseException):
    """A job killed mid-step (not an Exception: the runner records no failure, as for a real kill)."""


@pytest.mark.slow
def test_resumed_run_fetches_only_the_batches_it_still_trains_on(tiny_overrides, tmp_path, monkeypatch):
    """Resume without replay: killed in step 3 after a checkpoint at step 2, the resumed run asks the task
    for exactly the batches of steps 3..6 of the uninterrupted run, none before, and ends identical."""
    import runners.train as train_module
    from tasks.clip import ClipTask

    args = ["method=lora", "dataset=shapes", "trainer.max_steps=6", "trainer.checkpoint_every=2",
            "trainer.grad_accum=2", "trainer.log_every=1",
            *[o for o in tiny_overrides if not o.startswith(("trainer.max_steps", "trainer.checkpoint_every",
                                                            "trainer.log_every", "out_dir"))]]
    fetched: list = []
    real_batch = ClipTask.train_batch
    monkeypatch.setattr(ClipTask, "train_batch",
                        lambda self, *key: fetched.append(key) or real_batch(self, *key))
    reference = run(compose_config([*args, f"out_dir={tmp_path / 'reference'}"]))
    reference_keys, fetched[:] = list(fetched), []

    real_step, calls = train_module._optimizer_step, {"n": 0}

    def dying_step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Killed
        return real_step(*a, **k)

    monkeypatch.setattr(train_module, "_optimizer_step", dying_step)
    with pytest.raises(Killed):
        run(compose_config([*args, f"out_dir={tmp_path / 'resumed'}"]))
    monkeypatch.setattr(train_module, "_optimizer_step", real_step)
    fetched[:] = []
    resumed = run(compose_config([*args, f"out_dir={tmp_path / 'resumed'}"]))
    # steps 3..6, 2 micro-batches each
    assert len(reference_keys) == 6 * 2 and fetched == reference_keys[2 * 2:]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in reference["history"]]
    assert resumed["metrics"]["per_dataset"] == reference["metrics"]["per_dataset"]
    assert resumed["cost"]["data_wait_s"] is not None and resumed["cost"]["data_wait_s"] >= 0


def test_requeue_after_the_last_step_only_evaluates(tiny_overrides, tmp_path, monkeypatch):
    """Killed in the final evaluation, the rerun trains no step and evaluates the untrained model no
    second time: it reads the checkpoint written after the last step and the kept "before" evaluation."""
    import runners.train as train_module
    from tasks.clip import ClipTask

    base = ["method=lora", "dataset=shapes", "trainer.max_steps=3", "trainer.checkpoint_every=50",
            *[o for o in tiny_overrides
              if not o.startswith(("trainer.max_steps", "trainer.checkpoint_every", "out_dir"))]]
    args = [*base, f"out_dir={tmp_path / 'run'}"]
    calls = {"evaluate": 0, "probe": 0, "batches": 0}
    for owner, name, key in ((train_module, "_evaluate", "evaluate"), (ClipTask, "forgetting_probe", "probe"),
                             (ClipTask, "train_batch", "batches")):
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _r=real, _k=key, **k: calls.update({_k: calls[_k] + 1})
                            or _r(*a, **k))
    real_ranks = train_module.delta_ranks
    monkeypatch.setattr(train_module, "delta_ranks", lambda *a: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        run(compose_config(args))
    assert calls == {"evaluate": 2, "probe": 2, "batches": 3}
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    first_try = dict(calls)
    monkeypatch.setattr(train_module, "delta_ranks", real_ranks)
    calls.update(dict.fromkeys(calls, 0))
    requeued = run(compose_config(args))
    assert calls == {"evaluate": 1, "probe": 1, "batches": 0}, first_try
    reference = run(compose_config([*base, f"out_dir={tmp_path / 'reference'}"]))
    for part in ("per_dataset", "per_dataset_before", "forgetting"):
        assert requeued["metrics"][part] == reference["metrics"][part]
    assert [h["loss"] for h in requeued["history"]] == [h["loss"] for h in reference["history"]]
    assert requeued["cost"]["step_time_s"] is not None  # the measured figures of the first attempt, kept
    assert requeued["cost"]["activation_bytes"] == reference["cost"]["activation_bytes"] > 0
    assert not {"checkpoint.pt", "before.json"} & {p.name for p in (tmp_path / "run").iterdir()}


@pytest.mark.slow
def test_worker_processes_do_not_change_the_numbers(tiny_overrides, tmp_path):
    """Lazily processed pixels fetched by 2 DataLoader worker processes train exactly as in-process."""
    args = ["method=lora", "dataset=shapes", "task.data.preprocess=lazy",
            *[o for o in tiny_overrides if not o.startswith("out_dir")]]
    inline = run(compose_config([*args, "trainer.num_workers=0", f"out_dir={tmp_path / 'inline'}"]))
    workers = run(compose_config([*args, "trainer.num_workers=2", f"out_dir={tmp_path / 'workers'}"]))
    assert [h["loss"] for h in workers["history"]] == [h["loss"] for h in inline["history"]]
    assert workers["metrics"]["per_dataset"] == inline["metrics"]["per_dataset"]


def test_requeue_on_fewer_gpus_restores_the_rng_states_it_can(caplog):
    from runners.engine.checkpoint import cuda_rng_states

    saved = [torch.full((4,), float(i)) for i in range(4)]
    assert [d for d, _ in cuda_rng_states(saved, 4)] == [0, 1, 2, 3] and not caplog.records
    restored = cuda_rng_states(saved, 2)
    assert [d for d, _ in restored] == [0, 1] and torch.equal(restored[1][1], saved[1])
    assert "4 devices, this job sees 2" in caplog.text


def test_checkpoints_load_memory_mapped(tmp_path, monkeypatch):
    from runners.engine import checkpoint

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    checkpoint.save_checkpoint(tmp_path, model, opt, sched, {"step": 3, "config_hash": "h"})
    seen = {}
    load = torch.load
    monkeypatch.setattr(checkpoint.torch, "load", lambda *a, **k: seen.update(k) or load(*a, **k))
    assert checkpoint.load_checkpoint(tmp_path, model, opt, sched, "h")["step"] == 3
    assert seen.get("mmap") is True


@pytest.mark.parametrize("on_bad", ["restart", "stop"])
def test_an_unreadable_checkpoint_is_named_moved_aside_and_the_run_restarts_or_stops(on_bad, tiny_overrides,
                                                                                    tmp_path, caplog):
    """Junk in checkpoint.pt (a node lost mid-write): one line naming the file, the file kept beside it, then
    training from step 0 (restart) or a failed run saying so (stop); torch's own mmap error never surfaces."""
    from runners.train import RunFailed

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(b"not a checkpoint\n" * 64)
    cfg = compose_config(["method=lora", "dataset=shapes", *tiny_overrides,
                          f"trainer.on_bad_checkpoint={on_bad}"])
    if on_bad == "stop":
        with pytest.raises(RunFailed, match=r"checkpoint .*checkpoint\.pt cannot be read \(.*\); moved to "
                                            r"checkpoint\.pt\.unreadable-\d{8}T\d{6}; stopping"):
            run(cfg)
    else:
        record = run(cfg)
        assert record["run"]["status"] == "success" and record["history"][-1]["step"] == 4
        warned = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
        assert len(warned) == 1
        assert warned[0].endswith("training from the start (trainer.on_bad_checkpoint=restart)")
    kept = list(run_dir.glob("checkpoint.pt.unreadable-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == b"not a checkpoint\n" * 64
    assert not (run_dir / "checkpoint.pt").exists()
