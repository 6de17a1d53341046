"""Synthetic sweep outputs as schema-1 `results.json` files (runners/record/schema.py), for the analysis
tests.

Schema 1 on purpose: these files have no `run.lr`, `run.regime`, `run.model` or `run.method_kind`, so
every analysis test also checks that `runners.record.schema.upgrade_v1` fills them from the run's config.

`write_sweep` lays out `multirun/<date>/<time>/<job>/results.json` for 4 adapters x 3 budgets x 3 seeds
plus `full` and `none`, for a multi-dataset CLIP task (CPU: `peak_rss_bytes`) and a single-dataset
vision task (GPU: `peak_mem_bytes`), with one failed run and one corrupt file.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

ADAPTERS = ["lora", "loha", "lokr", "randlora"]
BUDGETS = [18432, 36864, 73728]  # lora4, lora8, lora16 on the tiny backbone
SEEDS = [0, 1, 2]
CLIP_DATASETS = ["cars", "dtd", "eurosat", "gtsrb", "mnist", "svhn"]
TASKS = {
    "clip": {"datasets": CLIP_DATASETS, "device": "cpu", "model": "tiny-clip", "shots": 16},
    "vision": {"datasets": ["digits"], "device": "cuda", "model": "tiny-vit", "shots": None},
}
# method -> (accuracy offset, memory factor, step-time factor, param factor vs budget)
_PROFILE = {
    "lora": (0.00, 1.00, 1.00, 1.00), "loha": (0.01, 1.12, 1.25, 0.98),
    "lokr": (-0.015, 1.05, 1.10, 1.03), "randlora": (0.03, 1.30, 1.45, 1.01),
}


def make_record(method: str, task: str, seed: int, budget: int | None, *, status: str = "success",
                rng: np.random.Generator | None = None) -> dict[str, Any]:
    """One realistic result record; accuracy grows with log(params), each method has an offset."""
    rng = rng or np.random.default_rng(0)
    spec = TASKS[task]
    datasets = spec["datasets"]
    before = {d: 0.25 + 0.3 * i / max(1, len(datasets) - 1) for i, d in enumerate(datasets)}
    if method == "none":
        params, acc_gain, mem, step = 1024, 0.0, 0.55, 0.5
    elif method == "full":
        params, acc_gain, mem, step = 5_600_000, 0.34, 2.4, 1.9
    else:
        off, mem, step, pf = _PROFILE[method]
        params = int(budget * pf) + 1024
        acc_gain = 0.18 + 0.04 * math.log2(budget / BUDGETS[0]) + off
    per = {d: float(np.clip(before[d] + acc_gain + rng.normal(0, 0.01), 0, 1)) for d in datasets}
    hp = _hp(method, budget)
    run = {
        "id": f"{task}-{method}-{budget}-{seed}", "method": method, "task": task,
        "dataset": None if len(datasets) > 1 else datasets[0], "size": "tiny", "seed": seed,
        "budget_target": budget, "hp": hp,
        "config": {"method": {"name": method, **hp}, "seed": seed, "budget": budget,
                   "task": {"name": task, "kind": task, "data": {"shots": spec["shots"], "fraction": None},
                            "model": {"path": spec["model"], "target_modules": ["q_proj", "v_proj"]}},
                   "size": {"name": "tiny"}, "trainer": {"lr": 1e-3, "max_steps": 150}},
        "git_commit": "0123456789abcdef0123456789abcdef01234567", "git_dirty": False,
        "versions": {"python": "3.11.9", "torch": "2.13.0", "transformers": "5.23.0"},
        "device": spec["device"], "started_at": "2025-11-22T10:00:00", "finished_at": "2025-11-22T10:01:00",
        "status": status, "error": None,
    }
    mem_key = "peak_mem_bytes" if spec["device"] == "cuda" else "peak_rss_bytes"
    cost = {"step_time_s": 0.05 * step * (1 + rng.normal(0, 0.03)), "step_time_p90_s": 0.06 * step,
            "samples_per_s": 64 / (0.05 * step), mem_key: int(300e6 * mem * (1 + rng.normal(0, 0.01))),
            "train_time_s": 8.0 * step}
    record = {"schema": 1, "run": run, "cost": cost, "history": [{"step": 10, "loss": 1.0, "lr": 1e-3}],
              "params": {"trainable": params, "total": 6_000_000,
                         "budget_error": None if budget is None else params / budget - 1,
                         "adapter_file_bytes": params * 4},
              "metrics": {"accuracy": float(np.mean(list(per.values()))),
                          "accuracy_before": float(np.mean(list(before.values()))),
                          "per_dataset": per, "per_dataset_before": before,
                          "delta_rank": _delta_rank(method, hp)}}
    if status == "failed":
        run["error"] = "RuntimeError: CUDA out of memory"
        record["metrics"], record["cost"] = {}, {}
    return record


def _hp(method: str, budget: int | None) -> dict[str, Any]:
    if budget is None:
        return {}
    r = budget // 4608
    return {"lora": {"r": r, "alpha": 2 * r}, "loha": {"r": max(1, r // 2), "alpha": r},
            "lokr": {"r": r, "factor": -1}, "randlora": {"r": max(1, 256 // r), "seed": 0}}[method]


def _delta_rank(method: str, hp: dict[str, Any]) -> dict[str, Any]:
    if method == "none":
        return {}
    rank = {"lora": lambda: hp["r"], "loha": lambda: min(64, hp["r"] ** 2),
            "lokr": lambda: min(64, 4 * hp["r"]),
            "randlora": lambda: 64, "full": lambda: 64}[method]()
    return {f"layer{i}.q_proj": {"rank": rank, "effective_rank": rank * (0.7 + 0.05 * i), "max_rank": 64}
            for i in range(2)}


def write_sweep(root: Path, tasks: tuple[str, ...] = ("clip", "vision"), failed: bool = True,
                corrupt: bool = True) -> Path:
    """Write a whole synthetic sweep under root/multirun and return that directory."""
    rng = np.random.default_rng(1234)
    out = root / "multirun"
    job = 0
    for task in tasks:
        configs = [(m, b, s) for m in ADAPTERS for b in BUDGETS for s in SEEDS]
        configs += [(ref, None, s) for ref in ("full", "none") for s in SEEDS]
        for method, budget, seed in configs:
            failing = failed and (task, method, budget, seed) == ("clip", "lora", BUDGETS[1], 2)
            status = "failed" if failing else "success"
            write_record(out / "2025-11-22" / f"10-00-{task}" / str(job),
                         make_record(method, task, seed, budget, status=status, rng=rng))
            job += 1
    if corrupt:
        bad = out / "2025-11-22" / "10-00-clip" / "999" / "nested"
        bad.mkdir(parents=True)
        (bad / "results.json").write_text('{"schema": 1, "run": {"method": "lora", "sta')
    return out


def write_record(run_dir: Path, record: dict[str, Any]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "results.json"
    path.write_text(json.dumps(record, indent=1))
    return path
