"""`zerokit sweep`: a grid (or random) sweep over any of a recipe's settings; each point a real run.

    zerokit sweep pretrain_gpt --out runs/lr_sweep train.lr=1e-3,3e-3,1e-2 model.preset=gpt-nano,gpt-tiny \\
        train.max_steps=300 --parallel 2
    zerokit sweep --preset seminar --out runs/seminar      # zerokit/recipes/sweeps/seminar.yaml

A setting whose value is a top-level comma list is swept (`train.betas=[0.9,0.99]` is one value, written as
YAML; `train.betas=[0.9,0.99],[0.9,0.95]` two), any other is a fixed override of every point. The grid is
the product of the swept settings, in the order given (`--random N --seed S`: N points drawn from it).
Every point is `python -m zerokit train RECIPE ... run_dir=OUT/points/<name>` in a process of its own
(`--ranks N`: under torchrun), `--parallel N` of them at a time, the CPU cores split between them
(train.cpu_threads). Every point's config is checked (zerokit.config) before any runs.

Resumable: OUT/sweep.json names the sweep (recipe, swept keys, fixed settings); a point whose summary.json
exists and whose saved config.yaml matches is not run again, a half-finished one continues (resume=auto,
from its newest checkpoint if train.checkpoint_every made any), and one whose config changed starts over
(resume=none: its old checkpoints move to checkpoints/abandoned/). zerokit.lab.sweep_report writes the
results (results.csv, plots, report.md, and the scaling-law fit where model size and tokens vary).
"""
from __future__ import annotations

import itertools
import json
import os
import random
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from zerokit.errors import UsageError
from zerokit.lab.flags import parser, run_cli
from zerokit.resources import RECIPE_CONFIGS, RECIPES, recipe_script

PRESETS = RECIPES / "sweeps"
OWN_KEYS = ("run_dir", "resume")  # the sweep sets these for every point
# Keys that may differ between a point's saved config and this invocation's without making it another run.
RUNTIME_KEYS = ("run_dir", "resume", "train.cpu_threads")


@dataclass
class Sweep:
    recipe: str
    swept: dict[str, list[str]]
    fixed: dict[str, str]
    config: str | None = None
    points: list[dict] = field(default_factory=list)  # {key: value} per point, in grid order

    def identity(self) -> dict:
        """What makes another sweep (the swept values may grow: a new value adds points)."""
        return {"recipe": self.recipe, "config": self.config, "swept_keys": list(self.swept), "fixed": self.fixed}


# ---------------------------------------------------------------------------------------- parsing
def split_values(raw: str) -> list[str]:
    """'1e-3,3e-3' -> ['1e-3', '3e-3']; commas inside [...], {...} or quotes do not split."""
    items, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(raw):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(raw[start:i])
            start = i + 1
    items.append(raw[start:])
    return [s.strip() for s in items]


def parse_assignments(items: list[str]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """['train.lr=1e-3,3e-3', 'train.max_steps=100'] -> ({'train.lr': ['1e-3', '3e-3']}, {'train.max_steps': '100'})."""
    swept, fixed = {}, {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"cannot read {item!r}: write key=value (fixed) or key=v1,v2,... (swept), e.g. train.lr=1e-3,3e-3")
        if key in OWN_KEYS:
            raise UsageError(f"{key} is set by the sweep for every point (OUT/points/<name>, resume=auto); drop {item!r}")
        if key in swept or key in fixed:
            raise UsageError(f"{key} is given twice; give it once (a comma list sweeps it)")
        values = split_values(raw)
        if "" in values:
            raise UsageError(f"{item!r} has an empty value; write key=v1,v2 with no empty item")
        if len(values) != len(set(values)):
            raise UsageError(f"{item!r} repeats a value; list each value once")
        if len(values) > 1:
            swept[key] = values
        else:
            fixed[key] = values[0]
    return swept, fixed


def as_override(value) -> str:
    """A YAML value (from a preset file) as it is written after key= (flow style: [0.9, 0.99])."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).split("\n")[0]


def load_preset(name: str) -> dict:
    """A preset: zerokit/recipes/sweeps/NAME.yaml, or a YAML path."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else PRESETS / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
        raise UsageError(f"sweep preset {name!r} not found; choose one of {known} or pass a YAML path")
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - {"recipe", "out", "parallel", "ranks", "sweep", "fixed"}
    if unknown or not isinstance(data.get("sweep", {}), dict) or not isinstance(data.get("fixed", {}), dict):
        raise UsageError(f"{path}: a preset has recipe, out, parallel, ranks, sweep: {{key: [values]}} and "
                         f"fixed: {{key: value}}" + (f"; unknown entries {sorted(unknown)}" if unknown else ""))
    data["sweep"] = {k: [as_override(v) for v in (vals if isinstance(vals, list) else [vals])]
                     for k, vals in (data.get("sweep") or {}).items()}
    data["fixed"] = {k: as_override(v) for k, v in (data.get("fixed") or {}).items()}
    return data


def grid(swept: dict[str, list[str]], random_n: int | None = None, seed: int = 0) -> list[dict]:
    """The product of the swept values (keys in the order given); `random_n`: that many of its points,
    drawn without replacement and kept in grid order."""
    points = [dict(zip(swept, combo)) for combo in itertools.product(*swept.values())]
    if random_n is not None and random_n < len(points):
        keep = sorted(random.Random(seed).sample(range(len(points)), random_n))
        points = [points[i] for i in keep]
    return points


def point_names(points: list[dict]) -> list[str]:
    """A folder name per point from its values: lr-0.001_preset-gpt-tiny (the last part of each key; the
    whole key where two keys end alike). Stable across invocations, so a later one finds the point again."""
    keys = list(points[0]) if points else []
    short = {k: k.rsplit(".", 1)[-1] for k in keys}
    if len(set(short.values())) < len(keys):
        short = {k: k for k in keys}
    clean = lambda v: re.sub(r"[^A-Za-z0-9.+-]+", "-", v).strip("-") or "x"
    names = ["_".join(f"{short[k]}-{clean(p[k])}" for k in keys) or "default" for p in points]
    if len(set(names)) < len(names):  # values that differ only in characters a folder name cannot hold
        names = [f"{n}_{i}" for i, n in enumerate(names)]
    return names


# ---------------------------------------------------------------------------------------- checking
def overrides(sweep: Sweep, point: dict) -> list[str]:
    return [f"{k}={v}" for k, v in {**sweep.fixed, **point}.items()]


def resolve_configs(sweep: Sweep, names: list[str], out: Path, extra: list[str]) -> list[dict]:
    """Every point's full config (zerokit.config's checks: unknown keys, RULES, paths), before anything runs."""
    from zerokit.config import load_config
    defaults = RECIPE_CONFIGS / f"{recipe_script(sweep.recipe).stem}.yaml"
    configs = []
    for name, point in zip(names, sweep.points):
        try:
            cfg = load_config(defaults, [*overrides(sweep, point), *extra, f"run_dir={out / 'points' / name}"], sweep.config)
        except UsageError as e:
            where = " ".join(f"{k}={v}" for k, v in point.items())
            raise UsageError(f"sweep point {name} ({where}): {e}") from None
        configs.append(comparable(cfg.to_dict()))
    return configs


def comparable(cfg: dict) -> dict:
    """A config as saved (YAML round trip), without the keys a re-invocation may change."""
    cfg = yaml.safe_load(yaml.safe_dump(cfg, sort_keys=False))
    for key in RUNTIME_KEYS:
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return cfg


def check_out(out: Path, sweep: Sweep) -> None:
    """--out is new, empty, or holds this same sweep."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the sweep")
    marker = out / "sweep.json"
    if marker.is_file():
        held = {k: v for k, v in json.loads(marker.read_text()).items() if k in sweep.identity()}
        if held != sweep.identity():
            diff = ", ".join(f"{k}: {held.get(k)!r} there, {v!r} now" for k, v in sweep.identity().items()
                             if held.get(k) != v)
            raise UsageError(f"--out {out} holds a different sweep ({diff}); choose another --out, or remove {out} "
                             "to start over")
    elif out.is_dir() and any(out.iterdir()):
        raise UsageError(f"--out {out} holds other files and no sweep.json; choose a new or empty folder")


def point_state(run_dir: Path, expected: dict) -> str:
    """done (finished with this config), partial (started with it), stale (another config) or new."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return "new"
    if comparable(yaml.safe_load(saved.read_text()) or {}) != expected:
        return "stale"
    return "done" if (run_dir / "summary.json").is_file() else "partial"


# ---------------------------------------------------------------------------------------- running
def launcher(ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]


def train_command(sweep: Sweep, point: dict, run_dir: Path, ranks: int, extra: list[str]) -> list[str]:
    config = ["--config", sweep.config] if sweep.config else []
    return [*launcher(ranks), "-m", "zerokit", "train", sweep.recipe, *config, *overrides(sweep, point), *extra,
            f"run_dir={run_dir}"]


def reproduce_command(cmd: list[str]) -> str:
    """The command as a user types it (python -m zerokit train ... or torchrun ...)."""
    words = ["python", *cmd[1:]] if cmd[1] != "-m" or cmd[2] != "torch.distributed.run" else ["torchrun", *cmd[3:]]
    return shlex.join(words)


def run_point(cmd: list[str], run_dir: Path, state: str) -> tuple[int, float]:
    """One point's run, its output in run_dir/sweep.log; returns (exit status, wall seconds)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if state == "stale":  # the old summary would make a half-finished restart look done
        (run_dir / "summary.json").unlink(missing_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    log_path = run_dir / "sweep.log"
    for resume in (["none"] if state == "stale" else ["auto", "none"]):
        start = log_path.stat().st_size if log_path.is_file() else 0
        with open(log_path, "a") as log:
            rc = subprocess.run([*cmd, f"resume={resume}"], stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        with open(log_path, errors="replace") as log:
            log.seek(start)
            # killed after its last checkpoint but before summary.json: resume=auto has nothing to do
            if rc != 0 or (run_dir / "summary.json").is_file() or "nothing to do:" not in log.read():
                break
    wall = time.perf_counter() - t0
    (run_dir / "sweep_point.json").write_text(json.dumps({"wall_s": wall, "exit": rc}))  # for later reports
    return rc, wall


def sweep_main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = parser("zerokit sweep", "Grid or random sweep over a recipe's settings: each point a real run; "
               "results.csv, plots, report.md (and a scaling-law fit when model size and tokens vary).",
               "zerokit sweep pretrain_gpt --out runs/lr train.lr=1e-3,3e-3,1e-2 model.preset=gpt-nano,gpt-tiny "
               "train.max_steps=200\n  zerokit sweep --preset seminar --out runs/seminar")
    p.add_argument("words", nargs="*", metavar="[RECIPE] KEY=V1,V2|KEY=VALUE",
                   help="the recipe (pretrain_gpt ...; a preset names its own), then settings: a comma list is swept")
    p.add_argument("--out", help="the sweep's folder (points/, results.csv, report.md); a preset may name one")
    p.add_argument("--preset", help="a sweep preset: zerokit/recipes/sweeps/NAME.yaml (seminar) or a YAML path")
    p.add_argument("--config", help="a YAML of recipe settings under every point (as zerokit train --config)")
    p.add_argument("--random", type=int, metavar="N", help="run N points drawn from the grid instead of all of it")
    p.add_argument("--seed", type=int, default=0, help="the draw's seed for --random (default 0)")
    p.add_argument("--parallel", type=int, help="points run at a time (default 1, or the preset's)")
    p.add_argument("--ranks", type=int, help="ranks per point, under torchrun (default 1, or the preset's)")
    p.add_argument("--dry-run", action="store_true", help="check every point and print their commands; run nothing")
    a = p.parse_intermixed_args(argv)  # settings may come before or after the options
    preset = load_preset(a.preset) if a.preset else {}
    words = list(a.words)
    recipe = words.pop(0) if words and "=" not in words[0] else preset.get("recipe")
    if not recipe:
        raise UsageError("name the recipe first (zerokit sweep pretrain_gpt --out DIR key=v1,v2) or pass --preset")
    recipe_script(recipe)  # an unknown recipe is a one-line error here
    swept, fixed = parse_assignments(words)
    swept = {**{k: v for k, v in preset.get("sweep", {}).items() if k not in fixed}, **swept}
    fixed = {**{k: v for k, v in preset.get("fixed", {}).items() if k not in swept}, **fixed}
    out = a.out or preset.get("out")
    parallel = a.parallel if a.parallel is not None else preset.get("parallel", 1)
    ranks = a.ranks if a.ranks is not None else preset.get("ranks", 1)
    if not out:
        raise UsageError("give the sweep's folder: --out DIR")
    if not swept:
        raise UsageError("nothing is swept: give at least one key=v1,v2,... (e.g. train.lr=1e-3,3e-3)")
    for flag, value in (("--parallel", parallel), ("--ranks", ranks), ("--random", a.random)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, not {value}")
    sweep = Sweep(recipe, swept, fixed, a.config, grid(swept, a.random, a.seed))
    out = Path(out).expanduser()  # as given: the points' commands name it so (they run in this directory)
    names = point_names(sweep.points)
    threads = max(1, len(os.sched_getaffinity(0)) // (parallel * ranks))
    # cores split between the points running at once; train.cpu_threads is not part of a point's identity
    extra = [f"train.cpu_threads={threads}"] if "train.cpu_threads" not in {**swept, **fixed} and parallel > 1 else []
    configs = resolve_configs(sweep, names, out, extra)
    check_out(out, sweep)
    cmds = [train_command(sweep, pt, out / "points" / n, ranks, extra) for pt, n in zip(sweep.points, names)]
    if a.dry_run:
        print("\n".join(f"{n}: {reproduce_command(c)}" for n, c in zip(names, cmds)))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "sweep.json.tmp"
    tmp.write_text(json.dumps({**sweep.identity(), "swept": swept, "command": ["zerokit", "sweep", *argv]}, indent=1))
    tmp.replace(out / "sweep.json")
    return run_all(sweep, names, cmds, configs, out, parallel, argv)


def run_all(sweep: Sweep, names: list[str], cmds: list[list[str]], configs: list[dict], out: Path,
            parallel: int, argv: list[str]) -> int:
    from zerokit.lab.sweep_report import point_result, write_outputs
    total, t_start, load0, started = len(names), time.perf_counter(), os.getloadavg(), time.strftime("%Y-%m-%d %H:%M:%S %Z")
    results = [None] * total

    def one(i: int) -> None:
        name, run_dir = names[i], out / "points" / names[i]
        state = point_state(run_dir, configs[i])
        tag = f"sweep: [{i + 1}/{total}] {name}"
        if state == "done":
            results[i] = point_result(run_dir, "done earlier", None)
            print(f"{tag}: done earlier, not re-run (val_loss {results[i].get('val_loss', float('nan')):.4f})", flush=True)
            return
        print(f"{tag}: started ({ {'new': 'new', 'partial': 'resuming', 'stale': 'config changed: restarting'}[state] })",
              flush=True)
        rc, wall = run_point(cmds[i], run_dir, state)
        ok = rc == 0 and point_state(run_dir, configs[i]) == "done"
        results[i] = point_result(run_dir, "ok" if ok else f"failed (exit {rc})", wall)
        print(f"{tag}: " + (f"finished: val_loss {results[i]['val_loss']:.4f} in {wall:.0f} s" if ok else
                            f"FAILED (exit {rc}, {'no summary.json' if rc == 0 else 'see the log'}): {run_dir / 'sweep.log'}"),
              flush=True)

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(one, range(total)))
    ran = sum(r["status"] != "done earlier" for r in results)
    timing = {"started": started, "ended": time.strftime("%H:%M:%S"), "wall_s": round(time.perf_counter() - t_start, 1),
              "points_run": ran, "points_skipped": total - ran, "parallel": parallel,
              "load_1min": [load0[0], os.getloadavg()[0]]}
    with open(out / "invocations.jsonl", "a") as f:  # every invocation's wall time, for the report
        f.write(json.dumps(timing) + "\n")
    rows = [{"name": n, **pt, **r, "command": reproduce_command(c)}
            for n, pt, r, c in zip(names, sweep.points, results, cmds)]
    written = write_outputs(out, sweep, rows, argv)
    failed = [r["name"] for r in rows if r["status"].startswith("failed")]
    print(f"sweep: {total - len(failed)}/{total} points ok in {timing['wall_s']:.0f} s -> " + ", ".join(map(str, written)))
    if failed:
        print(f"sweep: {len(failed)} point(s) failed: {', '.join(failed)}; run the same command again to retry them",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(run_cli(sweep_main))
