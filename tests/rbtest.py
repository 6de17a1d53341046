"""Helpers shared by the test packages: compose the real configs, run the real command line."""
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

import methods

ROOT = Path(__file__).resolve().parent.parent


def compose_config(overrides: list[str]) -> DictConfig:
    """The config `python run.py <overrides>` would run, composed from the real conf/ directory."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def source(**keys) -> DictConfig:
    """A data source as a run reads it: `keys` over the declared source defaults
    (conf/task/sources/defaults.yaml), merged by the run's own `with_source_defaults`."""
    from tasks.sources import with_source_defaults

    defaults = OmegaConf.load(ROOT / "conf" / "task" / "sources" / "defaults.yaml")
    return with_source_defaults(defaults, OmegaConf.create(keys), "the test's source")


def run_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python run.py ARGS` in a subprocess, as a user would."""
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, check=False)


def own(method: str, shapes: list[tuple[int, int]], **hp) -> dict:
    """`hp` as far as `method` has them (IA3 has no r, HRA no alpha), with `r` moved to the nearest value the
    method accepts on every shape with a non-empty adapter (OFT's block size must divide in; HRA's r is
    even). Native methods accept every r asked here, so theirs is unchanged."""
    cls = methods.get_method(method)
    hp = {k: v for k, v in hp.items() if k in cls.hp_spec}
    if "r" not in hp or _nonempty(method, shapes, hp):
        return hp
    fixed = {k: v for k, v in hp.items() if k != "r"}
    valid = [c["r"] for c in cls.budget_candidates(shapes, cls.resolve_hp(fixed))
             if _nonempty(method, shapes, {**fixed, "r": c["r"]})]
    return {**hp, "r": min(valid, key=lambda r: (abs(r - hp["r"]), r))}


def _nonempty(method: str, shapes: list[tuple[int, int]], hp: dict) -> bool:
    try:
        return all(methods.num_params(method, i, o, **hp) > 0 for i, o in shapes)
    except ValueError:
        return False


#: The registered methods whose layers are rankbench's own code; a PEFT-backed method runs PEFT's layers
#: (methods/peft_backed.py), so tests of our implementations (parity, compile, operator counts) skip it.
NATIVE_METHODS = [m for m in methods.available()
                  if not issubclass(methods.get_method(m), methods.peft_backed.PeftLayer)]
