"""`zerokit <command>` (or `python -m zerokit <command>`): the toolkit's command line. Each command lives in its own module
and exposes `main(argv) -> exit status`; user errors print one line and exit 2."""
from __future__ import annotations

import importlib
import sys

from zerokit.errors import UsageError

COMMANDS = {
    "train": ("zerokit.recipe", "train_main", "run a recipe: pretrain_gpt, finetune_sentiment, finetune_summarization"),
    "prepare": ("zerokit.data.prepare_cli", "prepare_main", "corpus -> filtered, deduplicated token shards + manifest.json"),
    "configs": ("zerokit.resources", "configs_main", "copy the recipe YAMLs and DeepSpeed JSONs out, for editing"),
    "export": ("zerokit.export", "export_main", "checkpoint -> Hugging Face model directory"),
    "warm-start": ("zerokit.models", "warm_start_main", "a causal LM or encoder-decoder from a pretrained encoder (MiniLM)"),
    "generate": ("zerokit.generate", "generate_main", "sample text from a model directory (+ LoRA adapter)"),
    "estimate": ("zerokit.lab.estimate", "estimate_main", "per-rank memory of a configuration, itemised"),
    "plan": ("zerokit.lab.planner", "plan_main", "configurations that fit, ranked by predicted step time"),
    "bench": ("zerokit.lab.bench", "bench_main", "sweep short real runs; CSV, plots, report.md"),
    "sweep": ("zerokit.lab.sweep", "sweep_main", "hyperparameter sweep of real recipe runs; CSV, plots, report.md, scaling fit"),
    "verify": ("zerokit.lab.verify", "verify_main", "real steps on local ranks: peak memory and step time vs the estimate"),
    "memtest": ("zerokit.lab.memtest", "memtest_main", "measure model-state bytes per rank vs the ZeRO formula"),
    "slurm": ("zerokit.launch", "slurm_main", "write (and submit) a SLURM batch script for a recipe"),
}


def usage() -> str:
    lines = ["usage: zerokit <command> [args]   (zerokit <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<10} {doc}" for name, (_, _, doc) in COMMANDS.items()]
    lines += ["", "examples:", "  zerokit train pretrain_gpt model.preset=gpt-tiny train.max_steps=100",
              "  torchrun --nproc_per_node 2 -m zerokit train pretrain_gpt ds_config=zero2",
              "  zerokit configs my_configs"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: unknown command '{argv[0]}'\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[argv[0]]
    debug = "--debug" in argv
    # `train` hands --debug on to the recipe, which reads it itself
    rest = argv[1:] if argv[0] == "train" else [a for a in argv[1:] if a != "--debug"]
    try:
        return getattr(importlib.import_module(module), func)(rest) or 0
    except UsageError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
