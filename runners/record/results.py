"""The result file: one `results.json` per run, written atomically so a crash never leaves half a file.

What goes in it is typed in `runners.record.schema` (the record's dataclasses and the schema version)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from runners.record.schema import SCHEMA_VERSION, Record

SCHEMA = SCHEMA_VERSION
FILENAME = "results.json"


def write_results(run_dir: str | Path, record: dict[str, Any] | Record) -> Path:
    """Write `record` to run_dir/results.json via a temp file + rename (atomic on POSIX)."""
    if isinstance(record, Record):
        record = record.to_dict()
    return write_json(Path(run_dir) / FILENAME, record)


def write_json(path: Path, obj: Any) -> Path:
    """Write `obj` as JSON to `path` via a temp file beside it + rename: a crash leaves the old file or
    the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=_jsonable)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_results(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's record, or None when there is none or it cannot be parsed."""
    path = Path(run_dir) / FILENAME
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_complete(run_dir: str | Path) -> bool:
    """True when the run directory already holds a successful result (a sweep re-run skips it)."""
    record = read_results(run_dir)
    return bool(record) and record.get("run", {}).get("status") == "success"


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


TUNING_FILE = "tuning.json"  # written into a final run's directory by +sweep=tuned (runners/sweeps/)


def read_tuning(run_dir: str | Path) -> dict[str, Any] | None:
    """The lr selection behind this run ({metric, split, chosen_lr, candidates}) when a tuned sweep
    launched it, copied into results.json as run.tuning; None for any other run."""
    path = Path(run_dir) / TUNING_FILE
    return json.loads(path.read_text()) if path.is_file() else None
