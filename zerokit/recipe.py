"""What every recipe script shares: command-line parsing, logging, the process group,
and turning a UsageError into one line and exit status 2."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from zerokit.config import Config, load_config
from zerokit.errors import UsageError

log = logging.getLogger("zerokit")


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S")


def parse_args(argv: list[str], description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description,
                                     epilog="Settings: key=value with dotted keys, e.g. train.max_steps=100 "
                                            "(see the recipe's YAML for every key).")
    parser.add_argument("--config", help="a YAML file of settings applied over the recipe's defaults")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for configuration errors")
    parser.add_argument("overrides", nargs="*", help="key=value settings")
    # accelerate/torchrun pass `--local_rank=N` to some scripts; the environment carries it too.
    args, unknown = parser.parse_known_args(argv)
    stray = [u for u in unknown if not u.startswith("--local_rank") and not u.startswith("--local-rank")]
    if stray:
        raise UsageError(f"unknown option(s) {' '.join(stray)}; settings are key=value, e.g. train.lr=3e-4")
    return args


def run_recipe(main: Callable[[Config], object], defaults: Path, description: str, argv: list[str] | None = None) -> int:
    """Parse argv into a Config, run `main(cfg)`, map user errors to exit status 2.

    Run as a script (argv None: the recipe's `__main__`) the process ends here, through
    zerokit.dist.exit_process (why: see there); called with an argv (tests, notebooks), it returns."""
    script = argv is None
    argv = sys.argv[1:] if argv is None else argv
    setup_logging(int(os.environ.get("RANK", "0")))
    debug = "--debug" in argv
    try:
        args = parse_args(argv, description)
        cfg = load_config(defaults, args.overrides, args.config)
        main(cfg)
        status = 0
    except UsageError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        status = 2
    finally:
        from zerokit.dist import exit_process, shutdown
        shutdown()
    if script:
        exit_process(status)
    return status
