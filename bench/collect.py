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
        metrics = summary.parent / "metrics.jsonl"
        if metrics.is_file():  # steady state: log intervals after the first 10 steps (start-up, compile)
            steady = [json.loads(l) for l in metrics.read_text().splitlines()]
            steady = [m for m in steady if m.get("step", 0) > 10 and "tokens_per_s" in m]
            if steady:
                s["tokens_per_s"] = sum(m["tokens_per_s"] for m in steady) / len(steady)
                s["mfu"] = sum(m.get("mfu") or 0 for m in steady) / len(steady) or None
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
