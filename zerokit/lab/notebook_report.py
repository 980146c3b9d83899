"""A notebook's report skeleton, the way `zerokit bench` writes its report.md (zerokit/lab/bench_report.py):
Setup (machine, versions, load, what ran), Results (the measured tables and the plots), Observations to edit.
Nothing here measures: the notebook passes its tables as lists of row dicts and its plots as saved files."""
from __future__ import annotations

import numbers
import os
import time
from pathlib import Path

from zerokit.lab.bench_report import machine, versions


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, (bool, str)):
        return str(v)
    if isinstance(v, numbers.Integral):
        return f"{v:,}"
    if isinstance(v, numbers.Real):
        if v != v:  # NaN: pandas' missing value
            return "-"
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v)


def md_table(rows: list[dict]) -> str:
    """A Markdown table of row dicts (columns: every key, first seen first); numbers to 4 significant digits (whole from 1,000)."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|---" * len(cols) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_report(path: Path, title: str, *, setup: list[str], tables: dict[str, list[dict]], plots: list[str],
                 observations: list[str]) -> Path:
    """report.md beside the plots: `setup` lines after the machine's, one table per `tables` entry (heading ->
    rows), the plots (file names relative to the report), and `observations` marked as text to edit."""
    m, v = machine(), versions()
    load = os.getloadavg()
    text = [f"# {title}", "", "## Setup", "",
            f"- Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, GPU: {m['gpu']}; {m['platform']}",
            f"- Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average (1/5/15 min) then "
            f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (on a shared machine timings vary run to run)",
            f"- Versions: Python {v['python']}, torch {v['torch']}, DeepSpeed {v['deepspeed']}, "
            f"transformers {v['transformers']}, zerokit {v['zerokit']}",
            *[f"- {s}" for s in setup], "", "## Results", ""]
    for heading, rows in tables.items():
        text += [f"### {heading}", "", md_table(rows), ""]
    text += [f"![{Path(p).stem}]({p})" + "\n" for p in plots]
    text += ["## Observations", "", "<!-- Auto-derived from the tables by the notebook: edit, extend or delete "
             "before publishing. -->", *[f"- {o}" for o in observations], ""]
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(text))
    tmp.replace(path)
    return path
