"""Turn a folder of runs (each with summary.json) into one Markdown table (stdout)."""
import argparse
import json
import platform
from pathlib import Path

import torch


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("root")
    p.add_argument("--title", default="Benchmark")
    p.add_argument("--command", default="")
    a = p.parse_args()
    rows = []
    for summary in sorted(Path(a.root).glob("*/summary.json")):
        s = json.loads(summary.read_text())
        mfu = f"{100 * s['mfu']:.1f}%" if s.get("mfu") else "-"
        rows.append(f"| {summary.parent.name} | {s.get('world_size', '-')} | {s['tokens_per_s']:,.0f} | {mfu} | "
                    f"{s['peak_mem_mb'] / 1024:.1f} |")
    versions = f"torch {torch.__version__}"
    for mod in ("deepspeed", "transformers", "accelerate"):
        try:
            versions += f", {mod} {__import__(mod).__version__}"
        except ImportError:
            pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "CPU"
    print(f"\n## {a.title}\n\nMachine: {gpu}; {versions}. Command: `{a.command}`. MFU against the dense bf16 "
          "peak in zerokit/metrics.py. Peak memory: max over ranks of the allocator peak (GiB).\n")
    print("| run | ranks | tokens/s (all ranks) | MFU | peak mem GiB |\n|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
