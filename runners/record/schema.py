"""The `results.json` record, typed and versioned: what a run writes and what `analysis` reads.

Standard library only (no torch, no omegaconf), so `analysis` can read results without the training
stack. The runner fills its record through these dataclasses (runners/record/builder.py: `new_record`,
`record_adaptation`, `finish`; `runners.engine.suite.summary_record`) and `analysis.load` reads every
file through `Record.from_dict`, which upgrades schema-1 files (`upgrade_v1`) and refuses anything else
with one line saying what is wrong. A field the runner writes but the schema lacks is an error, not a
silent extra: add it here (with a default, so older files still load) and bump `SCHEMA_VERSION` when
its meaning changes.

The committed JSON Schema (draft 2020-12) is generated from the dataclasses; regenerate it with

    python -m runners.record.schema > runners/record/results.schema.json
"""
from __future__ import annotations

import json
import numbers
import sys
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Literal, Union

SCHEMA_VERSION = 2


class _NotMeasured:
    """Default of a cost figure the run did not write (see Cost); never written to a file."""

    def __repr__(self) -> str:
        return "NOT_MEASURED"

    def __deepcopy__(self, memo: dict) -> _NotMeasured:  # dataclasses.asdict copies values: keep the one
        return self


NOT_MEASURED: Any = _NotMeasured()


@dataclass
class Run:
    """Who ran what, how and with which result status."""

    method: str
    status: Literal["running", "success", "failed"] = "success"
    error: str | None = None
    id: str | None = None
    method_kind: Literal["adapter", "reference"] | None = None  # runners.engine.adapt.method_info
    method_label: str | None = None  # what figures call the method ("LoRA", "Full FT")
    task: str | None = None
    dataset: str | None = None  # one dataset of the suite; None: every dataset of the task
    size: str | None = None
    model: str | None = None  # task.model.path as configured: asset name, local folder or hub id
    model_revision: str | None = None  # hub commit of the loaded model; None for local folders
    dataset_revisions: dict[str, str | None] | None = None  # dataset -> hub revision (None: local/generated)
    seed: int | None = None
    lr: float | None = None  # the backbone lr the run used (runners.engine.optimizer.method_lr)
    budget: int | str | None = None  # as configured: an int or "loraN"
    budget_target: int | None = None  # the budget in parameters
    hp: dict[str, Any] = field(default_factory=dict)
    regime: str | None = None  # tasks.regimes.regime_name: "full", "16shot", "frac0.5"
    max_steps: int | dict[str, int | None] | None = None  # a suite: per dataset
    memory_savers: dict[str, Any] | None = None
    world_size: int | None = None
    strategy: str | None = None  # trainer.strategy the processes trained under: single | ddp | fsdp
    tuning: dict[str, Any] | None = None  # +sweep=tuned: {metric, tie_break, split, chosen_lr, candidates}
    val_holdout: Any = None
    protocol: dict[str, Any] | None = None
    parts: dict[str, str] | None = None  # a suite's summary: dataset -> its results.json
    command: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    config_hash: str | None = None
    git_commit: str | None = None
    git_dirty: bool | None = None
    versions: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    gpu: dict[str, Any] | None = None
    started_at: str | None = None
    finished_at: str | None = None


@dataclass
class Params:
    """Trainable and total parameter counts; `trainable` is the budgeted (adapter or backbone) count."""

    trainable: int | None = None
    head_trainable: int | None = None
    total: int | None = None
    budget_target: int | None = None
    budget_error: float | None = None
    budget_reached: bool | None = None  # the solver met its tolerance (methods.budget)
    adapter_file_bytes: int | None = None
    per_layer: dict[str, Any] | None = None


@dataclass
class Cost:
    """runners.engine.measure figures: GPU allocator peaks on CUDA, RSS growth on CPU, and the
    device-independent activation and state bytes; a suite's are the mean (train time summed, memory the max).

    A figure this device or run does not produce (GPU figures on CPU, everything of a failed run) is
    `NOT_MEASURED`: absent from the file, so CPU and GPU figures never share a record; null is a figure
    the run produces but had no value for (step time with nothing to train). Readers that do not care
    take `cost_figures(cost)`: every field, None where absent."""

    step_time_s: float | None = NOT_MEASURED
    step_time_p90_s: float | None = NOT_MEASURED
    samples_per_s: float | None = NOT_MEASURED
    peak_mem_growth_bytes: int | None = NOT_MEASURED
    peak_mem_bytes: int | None = NOT_MEASURED
    peak_reserved_bytes: int | None = NOT_MEASURED
    peak_rss_bytes: int | None = NOT_MEASURED
    activation_bytes: int | None = NOT_MEASURED
    state_bytes: int | None = NOT_MEASURED
    train_time_s: float | None = NOT_MEASURED
    data_wait_s: float | None = NOT_MEASURED       # median wait for a step's batches, outside step_time_s
    data_wait_p90_s: float | None = NOT_MEASURED
    predicted_peak_bytes: int | None = NOT_MEASURED        # runners.engine.memplan: planned peak per process
    predicted_activation_bytes: int | None = NOT_MEASURED  # its activations (compare activation_bytes)
    predicted_state_bytes: int | None = NOT_MEASURED       # its exact state (compare state_bytes)
    # runners.engine.measure.StepCounts, one optimizer step (forward, backward, update); float: a suite's mean
    flops_per_step: float | None = NOT_MEASURED   # torch.utils.flop_counter.FlopCounterMode's total
    ops_per_step: float | None = NOT_MEASURED     # aten operators dispatched
    # trainer.compile (runners.engine.compiled): whether step_time_s timed the compiled model, and the first
    # compiled step's time beyond the median step (None when compiling failed and the run trained eager)
    compiled: bool | None = NOT_MEASURED
    compile_time_s: float | None = NOT_MEASURED

    def to_dict(self) -> dict[str, Any]:
        """The figures as results.json holds them: those measured."""
        return _plain(self)


@dataclass
class Metrics:
    """Evaluation after (and `_before`) training; `per_dataset` holds each dataset's primary metric."""

    accuracy: float | None = None
    accuracy_before: float | None = None
    eval_split: str | None = None  # "validation" or "test"
    per_dataset: dict[str, float] = field(default_factory=dict)
    per_dataset_before: dict[str, float] = field(default_factory=dict)
    per_dataset_metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # GLUE's own metrics too
    per_dataset_metrics_before: dict[str, dict[str, float]] = field(default_factory=dict)
    # examples scored per dataset (empty: not recorded)
    eval_examples: dict[str, int] = field(default_factory=dict)
    delta_rank: dict[str, dict[str, Any]] = field(default_factory=dict)
    forgetting: float | dict[str, Any] | None = None
    forgetting_per_dataset: dict[str, Any] | None = None


@dataclass
class HistoryEntry:
    step: int
    loss: float | None = None
    lr: float | None = None
    step_time_s: float | None = None
    accuracy: float | None = None


@dataclass
class Record:
    """One results.json."""

    run: Run
    params: Params = field(default_factory=Params)
    cost: Cost = field(default_factory=Cost)
    metrics: Metrics = field(default_factory=Metrics)
    history: list[HistoryEntry] = field(default_factory=list)
    schema: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict: every field (None where unknown), the cost figures that were measured."""
        return {"schema": self.schema, **{f.name: _plain(getattr(self, f.name)) for f in fields(self)
                                          if f.name != "schema"}}

    @classmethod
    def from_dict(cls, d: Any) -> Record:
        """A record from a parsed results.json of schema 1 or 2; ValueError naming the problem otherwise."""
        if not isinstance(d, dict):
            raise ValueError(f"top level is {type(d).__name__}, expected an object")  # a bad file: ValueError
        version = d.get("schema", 1)
        if version not in (1, SCHEMA_VERSION):
            raise ValueError(f"unknown results schema {version!r}; "
                             f"this rankbench reads 1 and {SCHEMA_VERSION}")
        if version == 1:
            d = upgrade_v1(d)
        return _build(cls, {**d, "schema": SCHEMA_VERSION}, "record")


def cost_figures(cost: Cost) -> dict[str, Any]:
    """Every cost field, None where the run did not measure it."""
    return {f.name: None if (v := getattr(cost, f.name)) is NOT_MEASURED else v for f in fields(Cost)}


def suite_cost(costs: list[Cost]) -> Cost:
    """A suite's cost from its datasets' runs (one rule for the runner's summary and analysis' combined
    sweep jobs): train time summed, memory figures the max, the rest the mean; a figure no part
    measured stays unmeasured."""
    out: dict[str, Any] = {}
    for f in fields(Cost):
        written = [getattr(c, f.name) for c in costs if getattr(c, f.name) is not NOT_MEASURED]
        values = [v for v in written if v is not None]
        if not values:
            out[f.name] = None if written else NOT_MEASURED
        elif f.name == "train_time_s":
            out[f.name] = sum(values)
        elif isinstance(values[0], bool):
            out[f.name] = all(values)
        elif f.name.endswith("_bytes"):
            out[f.name] = max(values)
        else:
            out[f.name] = sum(values) / len(values)
    return Cost(**out)


def suite_forgetting(parts: dict[str, Metrics]) -> dict[str, Any]:
    """A suite's forgetting from its datasets' runs: the mean over the runs that measured it, and each
    run's probe sets under `<trained dataset>/<probe set>` (one rule for the runner and analysis)."""
    values = [m.forgetting for m in parts.values() if isinstance(m.forgetting, (int, float))]
    per = {f"{n}/{probe}": v for n, m in parts.items()
           for probe, v in (m.forgetting_per_dataset or {}).items()}
    mean = sum(values) / len(values) if values else None
    return {"forgetting": mean, "forgetting_per_dataset": per or None}


# ----------------------------------------------------------------------------------- schema 1

#: What schema-1 files lacked: adapter or reference, and the name figures show
#: (runners.engine.adapt.method_info records both from schema 2 on; this table serves only the files
#: written before).
_V1_METHODS = {"full": ("reference", "Full FT"), "none": ("reference", "Head-only"),
               "lora": ("adapter", "LoRA"), "loha": ("adapter", "LoHa"), "lokr": ("adapter", "LoKr"),
               "randlora": ("adapter", "RandLoRA"), "vera": ("adapter", "VeRA")}


def upgrade_v1(d: dict[str, Any]) -> dict[str, Any]:
    """A schema-1 record as schema 2. Fields schema 1 lacked are filled explicitly:

    * `run.lr` (kept when the file has it): the lr the schema-1 runner used, by its rule
      `method.lr`, else `trainer.method_lr.<method>`, else `trainer.lr` of `run.config`; None without them.
    * `run.method_kind` / `run.method_label`: from `_V1_METHODS` (unknown names: adapter, named as is).
    * `run.regime` (kept when present): from `task.data.shots` / `task.data.fraction` of the config,
      named as tasks.regimes.regime_name names it ("16shot", "frac0.5", "full").
    * `run.model`: the config's `task.model.path`.
    * `run.model_revision`, `run.dataset_revisions`: None (schema 1 did not record them).
    * everything else missing: its default (None, {} or []).
    """
    run = d.get("run")
    if not isinstance(run, dict):
        raise ValueError("missing run section")  # a bad file: ValueError
    config = run.get("config")
    if not isinstance(config, dict):
        config = {}
    task = _node(config, "task")
    kind, label = _V1_METHODS.get(str(run.get("method")), ("adapter", run.get("method")))
    run = {"method_kind": kind, "method_label": label, "model": _node(task, "model").get("path"), **run}
    run.setdefault("lr", _v1_lr(config, run.get("method")))
    run.setdefault("regime", _v1_regime(_node(task, "data")))
    return {**d, "run": run}


def _node(config: dict[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key)
    return value if isinstance(value, dict) else {}


def _v1_lr(config: dict[str, Any], method: Any) -> float | None:
    trainer = _node(config, "trainer")
    value = (_node(config, "method").get("lr") or _node(trainer, "method_lr").get(str(method))
             or trainer.get("lr"))
    return None if value is None else float(value)


def _v1_regime(data: dict[str, Any]) -> str:
    if data.get("shots"):
        return f"{int(data['shots'])}shot"
    if data.get("fraction") is not None and float(data["fraction"]) < 1.0:
        return f"frac{float(data['fraction']):g}"
    return "full"


# ------------------------------------------------------------------------- checking and building


def _build(cls: type, d: Any, where: str) -> Any:
    """Dataclass `cls` from dict `d`, every value checked against its annotation."""
    if not isinstance(d, dict):
        raise ValueError(f"{where} is {type(d).__name__}, expected an object")  # a bad file: ValueError
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(d) - set(hints))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]} is not a field of results schema {SCHEMA_VERSION} "
                         f"(runners/record/schema.py {cls.__name__})")
    values = {}
    for f in fields(cls):
        if f.name in d:
            values[f.name] = _check(d[f.name], hints[f.name], f"{where}.{f.name}")
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ValueError(f"{where}.{f.name} is missing")
    return cls(**values)


def _check(value: Any, tp: Any, where: str) -> Any:
    """`value` if it fits type `tp` (dataclasses built from dicts), else ValueError naming `where`."""
    if tp is Any:
        return value
    if isinstance(tp, type) and is_dataclass(tp):
        return _build(tp, value, where)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return _check_union(value, args, where)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where} is {value!r}; valid: {', '.join(map(repr, args))}")
        return value
    if origin is dict and isinstance(value, dict):
        return {_check(k, args[0], where): _check(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if origin is list and isinstance(value, list):
        return [_check(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is None and _is_instance(value, tp):
        return value
    raise ValueError(f"{where} is {type(value).__name__} {_short(value)}, expected {_type_name(tp)}")


def _check_union(value: Any, args: tuple, where: str) -> Any:
    for arg in args:
        try:
            return _check(value, arg, where)
        except ValueError:
            continue
    raise ValueError(f"{where} is {type(value).__name__} {_short(value)}, expected "
                     f"{' or '.join(_type_name(a) for a in args)}")


def _is_instance(value: Any, tp: type) -> bool:
    """JSON's view of numbers: an int is a valid float; a bool is neither (numpy scalars count)."""
    if tp is type(None):
        return value is None
    if isinstance(value, bool):
        return tp is bool
    if tp is float:
        return isinstance(value, numbers.Real)
    if tp is int:
        return isinstance(value, numbers.Integral)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _plain(value: Any) -> Any:
    if is_dataclass(value):
        items = ((f.name, getattr(value, f.name)) for f in fields(value))
        return {k: _plain(v) for k, v in items if v is not NOT_MEASURED}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy / torch scalars
        return value.item()
    return value


# ---------------------------------------------------------------------------------- JSON Schema


def json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a schema-2 results.json, generated from the dataclasses: every
    field required (the runner writes them all, None where unknown) except cost figures (written as
    measured), no others allowed."""
    defs = {cls.__name__: _object_schema(cls) for cls in (Run, Params, Cost, Metrics, HistoryEntry)}
    top = _object_schema(Record)
    top["properties"]["schema"] = {"const": SCHEMA_VERSION}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": f"rankbench results.json (schema {SCHEMA_VERSION})",
            **top, "$defs": defs}


def _object_schema(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    return {"type": "object", "properties": {n: _type_schema(hints[n]) for n in names},
            "required": [] if cls is Cost else names, "additionalProperties": False}


def _type_schema(tp: Any) -> dict[str, Any]:
    if tp is Any:
        return {}
    if isinstance(tp, type) and is_dataclass(tp):
        return {"$ref": f"#/$defs/{tp.__name__}"}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return {"anyOf": [_type_schema(a) for a in args]}
    if origin is Literal:
        return {"enum": list(args)}
    if origin is dict:
        return {"type": "object", "additionalProperties": _type_schema(args[1])}
    if origin is list:
        return {"type": "array", "items": _type_schema(args[0])}
    return {"type": _JSON_TYPES[tp]}


_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


if __name__ == "__main__":
    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")
