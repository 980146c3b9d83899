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


def parse_args(argv: list[str], description: str, prog: str | None = None) -> argparse.Namespace:
    prog = prog or Path(sys.argv[0]).name
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"example:\n  {prog} train.max_steps=100 train.lr=3e-4 ds_config=zero2\n\n"
                                            "Settings: key=value with dotted keys (see the recipe's YAML for every key; "
                                            "`zerokit configs` copies them out).\nds_config= takes a JSON path, or a "
                                            "packaged name (zero0 ... zero3_offload).")
    parser.add_argument("--config", help="a YAML file of settings applied over the recipe's defaults")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for configuration errors")
    parser.add_argument("overrides", nargs="*", help="key=value settings")
    # accelerate/torchrun pass `--local_rank=N` to some scripts; the environment carries it too.
    args, unknown = parser.parse_known_args(argv)
    stray = [u for u in unknown if not u.startswith("--local_rank") and not u.startswith("--local-rank")]
    if stray:
        raise UsageError(f"unknown option(s) {' '.join(stray)}; settings are key=value, e.g. train.lr=3e-4")
    return args


def run_recipe(main: Callable[[Config], object], defaults: Path, description: str, argv: list[str] | None = None,
               prog: str | None = None, exit: bool | None = None) -> int:
    """Parse argv into a Config, run `main(cfg)`, map user errors to exit status 2.

    Run as a script (argv None: the recipe's `__main__`) or as `zerokit train` (exit=True), the process
    ends here, through zerokit.dist.exit_process (why: see there); called with an argv (tests,
    notebooks), it returns."""
    exit = argv is None if exit is None else exit
    argv = sys.argv[1:] if argv is None else argv
    setup_logging(int(os.environ.get("RANK", "0")))
    debug = "--debug" in argv
    try:
        args = parse_args(argv, description, prog)
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
    if exit:
        exit_process(status)
    return status


def cached_warm_start(name_or_path: str, cache: Path) -> str:
    """`warm-start:ENCODER` (e.g. warm-start:minilm) -> a causal LM warm-started from ENCODER (zerokit
    warm-start), written into `cache` on first use; the ranks of a run wait on a file lock, so one of
    them writes it. Any other name or path is returned unchanged."""
    if not str(name_or_path).startswith(WARM_START):
        return name_or_path
    from zerokit.locks import exclusive
    from zerokit.models import warm_start
    encoder = str(name_or_path)[len(WARM_START):]
    out = cache / "warm_start" / f"{encoder.replace('/', '--')}-causal-lm"
    with exclusive(out):
        if not (out / "config.json").is_file():
            log.info("writing the base %s to %s (once; later runs reuse it)", name_or_path, out)
            warm_start(encoder, out)
    return str(out)


WARM_START = "warm-start:"


def train_main(argv: list[str]) -> int:
    """`zerokit train RECIPE key=value ...`: the packaged recipe's `main`, as its script would run it."""
    import importlib

    from zerokit.resources import RECIPE_CONFIGS, recipe_names, recipe_script
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: zerokit train RECIPE [--config FILE] [key=value ...]\n\n"
              f"Run a packaged recipe ({', '.join(recipe_names())}); `zerokit train RECIPE --help` for its options.\n"
              "Under a launcher: torchrun --nproc_per_node 2 -m zerokit train RECIPE ...\n\n"
              "examples:\n  zerokit train pretrain_gpt model.preset=gpt-tiny train.max_steps=50\n"
              "  torchrun --nproc_per_node 2 -m zerokit train finetune_sentiment ds_config=zero2 peft=none\n"
              "  accelerate launch --num_processes 2 -m zerokit train pretrain_gpt ds_config=zero3",
              file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name = recipe_script(argv[0]).stem
    recipe = importlib.import_module(f"zerokit.recipes.{name}")
    return run_recipe(recipe.main, RECIPE_CONFIGS / f"{name}.yaml", recipe.__doc__.split("\n")[0], argv[1:],
                      prog=f"zerokit train {name}", exit=True)
