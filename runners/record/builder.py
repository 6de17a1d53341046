"""The results record of a run, built in one place through runners.record.schema.

`new_record` opens it before anything is built (config, provenance, method), the run fills it as it goes
(`record_adaptation`, then cost, metrics and history), `finish` closes it and checks it against the
schema before it is written, and `summary_table` is what the run prints at its end.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from runners.record.provenance import git_state, package_versions
from runners.record.results import SCHEMA
from runners.record.schema import Params, Record, Run

if TYPE_CHECKING:
    from runners.engine.adapt import Adaptation

log = logging.getLogger(__name__)

#: what a run's identity ignores: where and how it is logged, not what changes its numbers
NOT_IDENTITY = ("logger", "out_dir", "sweep", "plan")


def new_record(cfg: DictConfig, method: dict[str, str | None], lr: float) -> dict[str, Any]:
    """The record of a run about to start; `method` is its {kind, label} (runners.engine.adapt.method_info,
    both None for a name no registry knows: the run then fails naming the valid ones), `lr` the
    backbone lr it trains with (runners.engine.optimizer.method_lr)."""
    config = config_dict(cfg)
    digest = config_hash(config)
    commit, dirty = git_state()
    run = Run(id=run_id(cfg, digest), method=cfg.method.name, method_kind=method["kind"],
              method_label=method["label"], task=cfg.task.name, dataset=cfg.dataset, size=size_name(cfg),
              model=str(cfg.task.model.path), seed=cfg.seed, lr=lr, budget=cfg.budget,
              protocol=protocol_of(config), command=_command(), config=config, config_hash=digest,
              git_commit=commit, git_dirty=dirty, versions=package_versions(), started_at=_now(),
              status="running")
    return Record(run=run).to_dict()


def run_id(cfg: DictConfig, digest: str) -> str:
    """<task>-<method>-<size>-<budget>-s<seed>-<config hash>: readable, and unique per configuration."""
    budget = cfg.budget if cfg.budget is not None else "nobudget"
    return f"{cfg.task.name}-{cfg.method.name}-{size_name(cfg)}-{budget}-s{cfg.seed}-{digest[:8]}"


def size_name(cfg: DictConfig) -> str:
    return str(cfg.size.name) if "size" in cfg else "tiny"


def config_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)


def config_hash(config: dict[str, Any]) -> str:
    """Identity of a run: everything that changes its numbers (not where or how it is logged)."""
    keep = {k: v for k, v in config.items() if k not in NOT_IDENTITY}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:12]


def protocol_of(config: dict[str, Any]) -> dict[str, Any]:
    """The paper protocol the task config follows and its deliberate deviations (`task.protocol`:
    `source`, a list of `deviations`, each {what, why}, and `notes` on facts that could not be checked),
    so results never hide what differed."""
    protocol = (config.get("task") or {}).get("protocol") or {}
    return {"source": protocol.get("source"), "deviations": list(protocol.get("deviations") or []),
            "notes": list(protocol.get("notes") or [])}


def record_adaptation(record: dict[str, Any], a: Adaptation, total_params: int) -> None:
    """The solved hyper-parameters and the parameter counts of the adapted model."""
    record["run"].update(hp=a.hp, budget_target=a.budget_target)
    record["params"].update(asdict(Params(
        trainable=a.backbone_trainable, head_trainable=a.head_trainable, total=total_params,
        budget_target=a.budget_target, budget_error=a.budget_error, budget_reached=a.budget_reached,
        per_layer=a.per_layer)))


def finish(record: dict[str, Any], status: str, error: str | None) -> None:
    """Close the record and check it against runners.record.schema (filling what the run did not reach)."""
    record["run"].update(status=status, error=error, finished_at=_now())
    m = record["metrics"]
    for key, src in (("accuracy", "per_dataset"), ("accuracy_before", "per_dataset_before")):
        if m.get(src):
            m[key] = sum(m[src].values()) / len(m[src])
    try:
        checked = Record.from_dict(record).to_dict()
    except ValueError as err:
        if status == "success":
            raise
        log.error("the record of this failed run does not fit results schema %d (%s); written as it is",
                  SCHEMA, err)
        return
    record.clear()
    record.update(checked)


def summary_table(record: dict[str, Any]) -> str:
    """A short human-readable table of the run's headline numbers."""
    r, m, p, c = record["run"], record["metrics"], record["params"], record["cost"]
    mem_key = "peak_mem_growth_bytes" if c.get("peak_mem_growth_bytes") is not None else "peak_rss_bytes"
    rows = [("dataset", "before", "after")]
    rows += [(d, f"{m['per_dataset_before'][d]:.3f}", f"{acc:.3f}") for d, acc in m["per_dataset"].items()]
    rows.append(("mean", f"{m['accuracy_before']:.3f}", f"{m['accuracy']:.3f}"))
    width = max(len(row[0]) for row in rows)
    lines = [f"{r['method']} on {r['task']} ({r['size']}, seed {r['seed']}) hp={r['hp']}"]
    lines += [f"  {a:<{width}}  {b:>7}  {c_:>7}" for a, b, c_ in rows]
    step = c["step_time_s"]
    mem = c.get(mem_key)
    lines.append(f"  trainable params {p['trainable']:,} (+{p['head_trainable']:,} head) of {p['total']:,}"
                 + (f", budget error {p['budget_error']:+.2%}" if p["budget_error"] is not None else ""))
    lines.append(f"  step time {step * 1e3:.1f} ms" if step else "  step time n/a (nothing trained)")
    lines[-1] += f", {mem_key} {mem / 2**20:.1f} MiB" if mem is not None else ""
    lines.append(f"  train time {c['train_time_s']:.1f} s")
    return "\n".join(lines)


def _command() -> str | None:
    """The command line that launched this job (per job of a sweep), when running under Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return " ".join(["python run.py", *HydraConfig.get().overrides.task])


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
