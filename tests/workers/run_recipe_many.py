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
from zerokit.dist import exit_process, shutdown
from zerokit.recipe import setup_logging


def dump_logits(backend, path: Path) -> None:
    """The training engine's own logits on a fixed batch (every rank runs the forward: ZeRO-3/FSDP)."""
    import torch
    torch.manual_seed(0)
    ids = torch.randint(0, backend.module.config.vocab_size, (2, 16))
    backend.module.eval()
    with torch.no_grad():
        logits = backend.model(input_ids=ids).logits
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        torch.save({"input_ids": ids, "logits": logits.float().cpu()}, path)


def main() -> None:
    recipe, runs = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    spec = importlib.util.spec_from_file_location("recipe", recipe)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    setup_logging(0)
    defaults = recipe.parent / "configs" / f"{recipe.stem}.yaml"
    try:
        for overrides in runs:
            cfg = load_config(defaults, overrides)
            backend = module.main(cfg)
            if len(sys.argv) > 3 and sys.argv[3] == "--dump-logits":
                dump_logits(backend, Path(cfg.run_dir) / "engine_logits.pt")
    finally:
        shutdown()


if __name__ == "__main__":
    main()
    exit_process(0)  # not a plain return: see zerokit.dist.exit_process
