"""`zerokit sweep`'s outputs, from the points' own files (summary.json, config.yaml, metrics.jsonl):
results.csv, val_loss.png (validation loss against each swept key), loss_curves.png, report.md, and where
model size and tokens both vary, the Chinchilla fits (zerokit.lab.scaling_fit) in scaling.png. Nothing
here runs training."""
from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import numpy as np
import yaml

from zerokit.lab.bench_report import machine, versions, write_csv

SCORES = ("val_bpb", "val_accuracy", "rouge1", "rouge2", "rougeL")  # reported where a recipe's summary has them
_SIZES: dict = {}


def model_size(cfg: dict) -> tuple[int | None, float | None]:
    """(parameters, training FLOPs per token) of a point's model, built on the meta device from its saved
    config; (None, None) for a model this cannot build (e.g. a recipe's classifier head)."""
    model, data = cfg.get("model", {}), cfg.get("data", {})
    key = (model.get("preset"), model.get("name_or_path"), data.get("tokenizer"), data.get("vocab_size"),
           data.get("block_size") or data.get("max_length"), model.get("kv_heads"))
    if key not in _SIZES:
        _SIZES[key] = _build_size(*key)
    return _SIZES[key]


def _build_size(preset, name_or_path, tokenizer, vocab_size, seq, kv_heads):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from zerokit.metrics import model_flops_per_token
    from zerokit.models import count_params, model_config
    try:
        if name_or_path:
            config = AutoConfig.from_pretrained(name_or_path)
        else:
            if tokenizer != "train":  # the run's vocabulary is its tokenizer's
                from transformers import AutoTokenizer
                vocab_size = len(AutoTokenizer.from_pretrained(tokenizer))
            config = model_config(preset, vocab_size, seq, kv_heads=kv_heads)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError):
        return None, None
    return count_params(model), model_flops_per_token(model, seq or 1)


def point_result(run_dir: Path, status: str, wall_s: float | None) -> dict:
    """One point's numbers (empty where it did not finish) and its metrics lines (key `curve`)."""
    earlier = run_dir / "sweep_point.json"  # the wall time of the invocation that ran it
    if wall_s is None and earlier.is_file():
        wall_s = json.loads(earlier.read_text()).get("wall_s")
    row: dict = {"status": status, "wall_s": wall_s}
    summary_path, config_path = run_dir / "summary.json", run_dir / "config.yaml"
    if not summary_path.is_file() or status.startswith("failed"):
        return row
    s = json.loads(summary_path.read_text())
    row.update({k: s.get(k) for k in ("val_loss", *SCORES) if k in s})
    params, per_token = model_size(yaml.safe_load(config_path.read_text())) if config_path.is_file() else (None, None)
    tokens = s.get("tokens_seen")
    row.update({"params": params, "tokens_seen": tokens, "train_flops": per_token * tokens if per_token and tokens else None,
                "train_seconds": s.get("train_seconds"), "tokens_per_s": s.get("tokens_per_s"), "step": s.get("step")})
    metrics = run_dir / "metrics.jsonl"
    row["curve"] = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()] if metrics.is_file() else []
    return row


def finished(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("val_loss") is not None and not r["status"].startswith("failed")]


# -------------------------------------------------------------------------------------------- plots
def _number(value: str):
    try:
        v = yaml.safe_load(value)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float(value)
    except (ValueError, TypeError, yaml.YAMLError):
        return None


def plot_val_loss(rows: list[dict], swept: dict[str, list[str]], path: Path) -> None:
    """One panel per swept key: validation loss against its values, one line per value of the other keys."""
    from matplotlib.figure import Figure
    keys = list(swept)
    fig = Figure(figsize=(5.5 * len(keys), 4.5))
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    done = finished(rows)
    for ax, key in zip(axes, keys):
        nums = [_number(v) for v in swept[key]]
        numeric = all(n is not None for n in nums)
        pos = dict(zip(swept[key], nums if numeric else range(len(nums))))
        others = [k for k in keys if k != key]
        groups: dict = {}
        for r in done:
            groups.setdefault(tuple(r[k] for k in others), []).append(r)
        for combo, members in groups.items():
            members.sort(key=lambda r: pos[r[key]])
            label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(others, combo)) or None
            ax.plot([pos[r[key]] for r in members], [r["val_loss"] for r in members], "o-", label=label)
        if numeric and min(nums) > 0 and max(nums) / min(nums) >= 10:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(list(pos.values()))
            ax.set_xticklabels(list(pos), rotation=20, ha="right")
        ax.set_xlabel(key)
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"validation loss vs {key}")
        if others:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_curves(rows: list[dict], path: Path) -> None:
    """Training loss (lines) and validation loss (dots) of every point against the tokens it has seen."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    fig = Figure(figsize=(9, 5.5))
    ax = fig.subplots()
    done = finished(rows)
    colors = colormaps["tab20"].colors if len(done) <= 20 else colormaps["viridis"](np.linspace(0, 0.95, len(done)))
    for color, r in zip(colors, done):
        per_step = (r["tokens_seen"] or 0) / r["step"] if r.get("step") else 0
        train = [(m["step"] * per_step, m["loss"]) for m in r["curve"] if m.get("loss") is not None]
        val = [(m["step"] * per_step, m["val_loss"]) for m in r["curve"] if m.get("val_loss") is not None]
        if train:
            ax.plot(*zip(*train), color=color, lw=1, label=r["name"])
        if val:
            ax.plot(*zip(*val), "o", color=color, ms=4)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token): training (lines), validation (dots)")
    ax.set_yscale("log")
    ax.set_title("loss curves")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# -------------------------------------------------------------------------------------------- scaling
def scaling_points(rows: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(N, D, C = 6ND, L): for each (parameters, tokens) the lowest validation loss over the other swept keys
    (a learning-rate sweep contributes its best LR, as the paper tunes each run)."""
    best: dict = {}
    for r in finished(rows):
        if r.get("params") and r.get("tokens_seen") and r.get("train_flops"):
            key = (r["params"], r["tokens_seen"])
            if key not in best or r["val_loss"] < best[key]["val_loss"]:
                best[key] = r
    pts = list(best.values())
    n, d, loss = (np.array([r[k] for r in pts], dtype=float) for k in ("params", "tokens_seen", "val_loss"))
    return n, d, 6 * n * d, loss  # C = 6ND, the paper's convention, in which N_opt(C) is derived


def fit_scaling(rows: list[dict], bootstrap: int = 100):
    """(approach 3 fit or None, approach 1 fit or None, the points); None where sizes and tokens do not both vary."""
    from zerokit.lab.scaling_fit import fit_envelope, fit_law
    n, d, c, loss = pts = scaling_points(rows)
    if len(set(n)) < 2 or len(set(d)) < 2 or len(n) < 5:
        return None, None, pts
    return fit_law(n, d, loss, bootstrap=bootstrap), fit_envelope(n, c, loss), pts


def plot_scaling(law, env, pts, path: Path) -> None:
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    n, d, c, loss = pts
    fig = Figure(figsize=(12, 5))
    left, right = fig.subplots(1, 2)
    sizes = sorted(set(n))
    colors = dict(zip(sizes, colormaps["plasma"](np.linspace(0, 0.85, len(sizes)))))
    grid = np.geomspace(c.min() / 1.5, c.max() * 1.5, 100)
    for s in sizes:
        at = n == s
        left.scatter(c[at], loss[at], color=colors[s], label=f"N={s / 1e6:.3g}M", zorder=3)
        left.plot(grid, law.predict(s, grid / (6 * s)), color=colors[s], lw=1, alpha=0.7)
    n_opt = law.n_opt(grid)
    left.plot(grid, law.predict(n_opt, grid / (6 * n_opt)), "k--", lw=1.5, label="compute-optimal (fit)")
    left.set(xscale="log", yscale="log", xlabel="training compute C = 6ND (FLOPs)", ylabel="validation loss")
    left.set_title(f"approach 3: L = {law.E:.2f} + {law.A:.3g}/N^{law.alpha:.3f} + {law.B:.3g}/D^{law.beta:.3f}\n"
                   f"alpha {law.alpha:.3f}±{law.spread('alpha'):.3f}, beta {law.beta:.3f}±{law.spread('beta'):.3f}, "
                   f"N_opt ∝ C^{law.a:.2f}±{law.spread('a'):.2f}", fontsize=9)
    left.legend(fontsize=7)
    right.plot(grid, n_opt, "k--", label=f"approach 3: a = {law.a:.2f}±{law.spread('a'):.2f}")
    if env is not None:
        right.scatter(env.budgets, env.n_opt, color="tab:blue", label="min-loss envelope")
        right.plot(grid, np.exp(env.log_k) * grid ** env.a, color="tab:blue",
                   label=f"approach 1: a = {env.a:.2f}±{env.a_spread:.2f}")
    right.set(xscale="log", yscale="log", xlabel="training compute C = 6ND (FLOPs)", ylabel="compute-optimal parameters N_opt")
    right.set_title("N_opt ∝ C^a (bootstrap ± over points)", fontsize=9)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def scaling_text(law, env, pts) -> str:
    if law is None:
        return ("No scaling-law fit: it needs model size and tokens both swept (at least 2 values each, 5 points "
                "with a validation loss).")
    lines = [f"From {len(pts[0])} (N, D) points (the lowest loss over the other swept keys at each; N all parameters, "
             "D tokens seen, C = 6ND): Chinchilla approach 3, Huber loss (delta 1e-3) on log L from 432 initialisations; "
             "± = half the 16-84 % range of the bootstrap over points "
             f"({len(law.boot.get('a', []))} resamples): a ± far above the value means the points do not pin it down.", "",
             "| | value | ± |", "|---|---|---|"]
    for name in ("E", "A", "B", "alpha", "beta", "a"):
        lines.append(f"| {name} | {getattr(law, name):.4g} | {law.spread(name):.2g} |")
    lines += ["", f"Compute-optimal split (approach 3): N_opt ∝ C^{law.a:.2f}, D_opt ∝ C^{1 - law.a:.2f} "
              "(Chinchilla: 0.46 / 0.54 by approach 3, 0.50 / 0.50 by approach 1)."]
    if env is not None:
        lines.append(f"Approach 1 (min-loss envelope over {len(env.budgets)} FLOP budgets): N_opt ∝ "
                     f"C^{env.a:.2f} ± {env.a_spread:.2f} ({len(env.boot)} bootstrap resamples with a bracketed envelope).")
    else:
        lines.append("Approach 1: no envelope (needs at least 3 model sizes, each at 2+ token counts, whose minimum "
                     "at some budget lies between the smallest and largest size).")
    return "\n".join(lines) + "\n\n![loss vs FLOPs with the fit; N_opt vs C](scaling.png)\n"


# -------------------------------------------------------------------------------------------- report
CSV_TAIL = ("val_loss", *SCORES, "params", "tokens_seen", "train_flops", "train_seconds", "tokens_per_s", "wall_s",
            "status")


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def md_table(rows: list[dict], keys: list[str]) -> str:
    cols = ["name", *keys, *[c for c in CSV_TAIL if any(r.get(c) is not None for r in rows)]]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def invocations_text(out: Path) -> str:
    """Each invocation of the sweep on this folder: when, wall time, points run and skipped, load average."""
    path = out / "invocations.jsonl"
    lines = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
    return "\n".join(f"  - {t.get('started', '?')} to {t.get('ended', '?')}: {t['wall_s']:.0f} s wall, {t['points_run']} point(s) run, "
                     f"{t['points_skipped']} finished earlier and skipped, {t['parallel']} at a time; load average "
                     f"(1 min) {t['load_1min'][0]:.1f} at start, {t['load_1min'][1]:.1f} at the end" for t in lines)


def write_outputs(out: Path, sweep, rows: list[dict], argv: list[str]) -> list[Path]:
    keys = list(sweep.swept)
    cols = [c for c in CSV_TAIL if c not in SCORES or any(r.get(c) is not None for r in rows)]
    write_csv([{"name": r["name"], **{k: r[k] for k in keys}, **{c: r.get(c) for c in cols}} for r in rows],
              out / "results.csv")
    written = [out / "results.csv", out / "report.md"]
    done = finished(rows)
    if done:
        plot_val_loss(rows, sweep.swept, out / "val_loss.png")
        plot_curves(rows, out / "loss_curves.png")
        written += [out / "val_loss.png", out / "loss_curves.png"]
    law, env, pts = fit_scaling(rows)
    if law is not None:
        plot_scaling(law, env, pts, out / "scaling.png")
        written.append(out / "scaling.png")
    m, v = machine(), versions()
    best = min(done, key=lambda r: r["val_loss"]) if done else None
    best_text = (f"**{best['name']}**: validation loss {best['val_loss']:.4f}"
                 + (f", {best['val_bpb']:.4f} bits per byte" if best.get("val_bpb") is not None else "")
                 + f" ({', '.join(f'{k}={best[k]}' for k in keys)}). To run it again:\n\n```bash\n{best['command']}\n```"
                 if best else "No point finished.")
    plots = ("![validation loss against each swept key](val_loss.png)\n\n![loss curves](loss_curves.png)"
             if done else "")
    (out / "report.md").write_text(f"""# zerokit sweep: {sweep.recipe}, {len(rows)} points

## Setup

- Command: `{shlex.join(['zerokit', 'sweep', *argv])}`
- Swept: {'; '.join(f'`{k}` = {", ".join(vals)}' for k, vals in sweep.swept.items())}
- Fixed for every point: {' '.join(f'`{k}={val}`' for k, val in sweep.fixed.items()) or 'nothing'}
- Invocations (wall time of the whole sweep command; a shared machine: times vary with its load):
{invocations_text(out)}
- Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, GPU: {m['gpu']}
- Versions: Python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, zerokit {v['zerokit']}

## Results

{md_table(rows, keys)}

Every column is in [results.csv](results.csv); each point's run is in `points/<name>/`. params: all
parameters; train_flops: FLOPs per token (6 x the matmul parameters + attention) x tokens seen.

## Best point

{best_text}

{plots}

## Scaling law

{scaling_text(law, env, pts)}""")
    return written
