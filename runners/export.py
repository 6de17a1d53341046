"""A run's adapter out of rankbench, for any PEFT or transformers user.

    python -m runners.export RUN_DIR --out DIR            # PEFT adapter folder (PeftModel.from_pretrained)
    python -m runners.export RUN_DIR --out DIR --merged   # the base model with dW merged in (from_pretrained)

The conversion (and the way back, `+init_adapter=DIR` on run.py) is runners/engine/peft_files.py.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from runners.engine.peft_files import export_merged, export_peft


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runners.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (results.json + adapter/)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write")
    parser.add_argument("--merged", action="store_true", help="write the merged model, not the adapter")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        (export_merged if args.merged else export_peft)(args.run_dir, args.out)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"export: {err}") from None  # one line on stderr, exit status 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
