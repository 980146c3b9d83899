"""Run one recipe's `main` several times in one launch (one process group), each with its own
key=value overrides: the multi-rank suites pay the launch and import cost once, not per engine.

    torchrun --nproc_per_node 2 tests/workers/run_recipe_many.py recipes/pretrain_gpt.py runs.json
runs.json: a list of override lists. Each run is exactly what `python recipe key=value...` does.
"""
import importlib.util
import json
import sys
from pathlib import Path

from zerokit.config import load_config
from zerokit.dist import shutdown
from zerokit.recipe import setup_logging


def main() -> None:
    recipe, runs = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    spec = importlib.util.spec_from_file_location("recipe", recipe)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    setup_logging(0)
    defaults = recipe.parent / "configs" / f"{recipe.stem}.yaml"
    try:
        for overrides in runs:
            module.main(load_config(defaults, overrides))
    finally:
        shutdown()


if __name__ == "__main__":
    main()
