"""The lab's one command-line vocabulary: every lab command (estimate, plan, verify, memtest, bench)
spells the same thing the same way, with the same choices; sizes read and print one way.

    --model    a preset or HF-style alias (zerokit.models.model_config), or a folder with config.json
    --gpus     ranks (GPUs) per node: on a machine without GPUs, CPU ranks
    --stage    ZeRO stage 0-3
    --offload  none | optimizer | params | all   (all = optimizer state and parameters)
    --optim    adamw | lion | adamw8bit | lion8bit | muon   (a run's optim.name)
"""
from __future__ import annotations

import argparse
import sys

from zerokit.errors import UsageError

GiB = 2**30
MiB = 2**20

STAGES = (0, 1, 2, 3)
# what leaves the GPU: optimizer = fp32 master + Adam state (+ the fp32 gradient partition);
# params = the ZeRO-3 weight partition; all = both (ZeRO-Infinity)
OFFLOADS = ("none", "optimizer", "params", "all")
PRECISIONS = ("fp32", "bf16", "fp16")


def parser(prog: str, description: str, example: str) -> argparse.ArgumentParser:
    """An ArgumentParser whose --help ends with a runnable example."""
    return argparse.ArgumentParser(prog=prog, description=description, epilog=f"example:\n  {example}",
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_model(p, default: str | None = None) -> None:
    p.add_argument("--model", required=default is None, default=default,
                   help="preset or alias (e.g. gpt-tiny, gpt2, gpt2-medium, llama-7b) or a folder with config.json"
                        + (f" (default {default})" if default else ""))


def add_gpus(p, default: int = 1, many: bool = False, old: str | None = None) -> None:
    """--gpus; `many`: a list of values (one measurement each); `old`: a former spelling, kept hidden."""
    kw = dict(type=int, nargs="+", default=[default]) if many else dict(type=int, default=default)
    p.add_argument("--gpus", dest="gpus", help="ranks (GPUs) per node; CPU ranks where there is no GPU"
                   + (", one run per value" if many else "") + f" (default {default})", **kw)
    if old:
        p.add_argument(old, dest="gpus", help=argparse.SUPPRESS, **kw)


def add_stage(p, default: int = 0) -> None:
    p.add_argument("--stage", type=int, choices=STAGES, default=default, help=f"ZeRO stage (default {default})")


def add_offload(p) -> None:
    p.add_argument("--offload", choices=OFFLOADS, default="none",
                   help="what ZeRO moves to the CPU: optimizer (fp32 master + Adam), params (the ZeRO-3 weight "
                        "partition), all (both)")


def add_optim(p) -> None:
    from zerokit.optim import OPTIMIZERS
    p.add_argument("--optim", choices=OPTIMIZERS, default="adamw",
                   help="the run's optim.name: whose optimizer state to count (default adamw)")


def add_seq(p, default: int | None) -> None:
    p.add_argument("--seq", type=int, default=default,
                   help="sequence length" + (f" (default {default})" if default else
                                             " (default: min(1024, the model's context))"))


def add_precision(p, default: str | None, note: str = "") -> None:
    p.add_argument("--precision", choices=PRECISIONS, default=default, help=note or f"(default {default})")


def add_micro_batch(p, default: int = 1) -> None:
    p.add_argument("--micro-batch", type=int, default=default, help=f"sequences per rank per micro-step (default {default})")


def add_json(p, to_file: bool = False) -> None:
    if to_file:
        p.add_argument("--json", metavar="PATH", help="also write every row here as JSON")
    else:
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def offload_parts(offload: str) -> tuple[bool, bool]:
    """(optimizer offloaded, parameters offloaded) for an --offload value."""
    return offload in ("optimizer", "all"), offload in ("params", "all")


def check_offload(stage: int, offload: str) -> None:
    opt, params = offload_parts(offload)
    if opt and stage == 0:
        raise UsageError(f"--offload {offload} needs ZeRO: use --stage 1, 2 or 3")
    if params and stage != 3:
        raise UsageError(f"--offload {offload} needs --stage 3 (DeepSpeed offloads parameters only in ZeRO-3)")


def parse_bytes(text: str) -> int:
    """'80GB', '24GiB', '512G', '1.5TB' -> bytes (GB and GiB both mean 2**30: GPU and DIMM sizes are binary)."""
    t = str(text).strip().upper().replace("IB", "B")
    for suffix, mult in (("TB", 2**40), ("GB", GiB), ("MB", MiB), ("T", 2**40), ("G", GiB), ("M", MiB), ("B", 1)):
        if t.endswith(suffix):
            t, m = t[: -len(suffix)], mult
            break
    else:
        m = GiB  # a bare number means GiB
    try:
        return int(float(t) * m)
    except ValueError:
        raise UsageError(f"cannot read {text!r} as a size: write e.g. 80GB or 512GiB") from None


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:,.2f} GiB" if abs(n) >= GiB else f"{n / MiB:,.1f} MiB"


def run_cli(main, argv=None) -> int:
    """`python -m zerokit.lab.X`: a UsageError is one line and exit 2, as under `zerokit X`."""
    try:
        return main(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
