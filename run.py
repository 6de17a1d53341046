"""rankbench entry point: `python run.py method=randlora task=clip` (configs in conf/, see README)."""
import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

log = logging.getLogger("rankbench")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from runners.train import RunFailed, run

    try:
        return run(cfg)["metrics"].get("accuracy")
    except RunFailed as err:
        log.error("%s", err)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return None  # the sweep goes on; results.json records the failure and it re-runs next time
        sys.exit(1)


if __name__ == "__main__":
    from runners.engine.config import command_line_problem

    if (problem := command_line_problem(sys.argv[1:])) is not None:
        sys.exit(f"rankbench: {problem}")
    main()
