"""Command-line pre-flight: turn Hydra's multi-line composition errors into one clear line.

`run.py` composes the config once with Hydra's compose API before handing over to `@hydra.main`, so a
typo such as `task=clpi` or `trainer.max_step=5` ends with one line naming what is wrong and what is valid.
"""
from __future__ import annotations

import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def preflight(argv: list[str]) -> str | None:
    """Return a one-line error for a command line whose config cannot be composed, else None."""
    if any(a.startswith(("--hydra-help", "--help", "-h")) for a in argv):
        return None  # help needs no config
    overrides = [a for a in argv if not a.startswith("-") and "=" in a]
    if any(a in ("-m", "--multirun") for a in argv):
        overrides = _without_sweeps(overrides)  # the sweeper validates the sweep itself
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        return one_line(str(err))
    return None


def compose_config(overrides: list[str]) -> "DictConfig":
    """The job config `python run.py <overrides>` would run with (no Hydra run directory needed);
    a composition error exits with the same one line as run.py."""
    if (problem := preflight(overrides)) is not None:
        raise SystemExit(f"rankbench: {problem}")
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def one_line(message: str) -> str:
    """Condense a Hydra/OmegaConf error message to the part a user needs."""
    missing = re.search(r"Could not find '([^']+)/([^']+)'", message)
    if missing:
        group, choice = missing.groups()
        options = _options(group)
        return f"unknown {group} {choice!r}; valid: {', '.join(options) or '(none found)'}"
    override = re.search(r"Could not override '([^']+)'", message)
    if override:
        key = override.group(1)
        return (f"unknown config key {key!r} (check the spelling; `python run.py --cfg job` lists every key; "
                f"use +{key}=... only to add a new key)")
    first = next((line.strip() for line in message.splitlines() if line.strip()), message)
    return f"invalid command line: {first}"


def _without_sweeps(overrides: list[str]) -> list[str]:
    """Drop `key=a,b` style sweep values: compose checks one job's config, not the product."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return overrides  # let compose report the syntax error
    return [o.input_line for o in parsed if not o.is_sweep_override()]


def _options(group: str) -> list[str]:
    """Choices of a config group, including those plugins provide (e.g. hydra/launcher=submitit_local)."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return sorted(GlobalHydra.instance().config_loader().get_group_options(group))
