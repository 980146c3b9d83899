"""Run the real recipes as subprocesses (python, torchrun, accelerate launch) and read back
what they wrote. Multi-rank tests go through the same launchers users type."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from zerokit.lab.workers import kill_tree

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PRETRAIN = str(REPO / "recipes" / "pretrain_gpt.py")
# DeepSpeed JIT-builds its CPU ops (shm_comm, cpu_adam) on first use, under a lock file that a killed
# build leaves behind, after which every later build waits on it forever. The tests build into the
# venv (fresh on a clean machine) instead of ~/.cache, and conftest clears locks that outlived their build.
EXTENSIONS = Path(sys.prefix) / "torch_extensions"

# A tiny, fast, dropout-free setup whose runs are comparable step by step.
TINY = ["model.preset=gpt-tiny", "model.dropout=0.0", "data.block_size=32", "data.vocab_size=512",
        "data.eval_batches=4", "train.eval_every=0", "train.log_every=1", "train.checkpoint_every=0",
        "train.warmup_steps=2", "train.lr=1e-3", "train.min_lr=1e-4", "sample.max_new_tokens=8", "resume=none",
        "train.max_minutes=0",  # step-count runs: exact and reproducible (the demo YAML has a time budget)
        "optim.name=adamw"]  # the demo YAML's Muon is refused by FSDP2 and ZeRO-3 (reduce_scatter) and differs across engines


def env(**extra) -> dict:
    e = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PATH=f"{BIN}:{os.environ['PATH']}",
             TORCH_EXTENSIONS_DIR=str(EXTENSIONS))
    e.update({k: str(v) for k, v in extra.items()})
    return e


def launcher(nproc: int, kind: str = "torchrun", ds_config: str | None = None) -> list[str]:
    if kind == "python":
        return [sys.executable]
    if kind == "accelerate":
        cmd = [str(BIN / "accelerate"), "launch", "--num_processes", str(nproc), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no"]
        if ds_config:
            cmd += ["--use_deepspeed", "--deepspeed_config_file", ds_config]
        elif nproc > 1:
            cmd += ["--multi_gpu"]
        return cmd
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc)]


def run(cmd: list[str], timeout: float = 600, check: bool = True, **env_extra) -> subprocess.CompletedProcess:
    # Its own session, and on timeout the launcher *and every rank* are killed: an orphaned rank would
    # hold its port, memory and CPU and slow or hang the tests after it.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(**env_extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_all(proc)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)}\ntimed out after {timeout:.0f} s\n--- stderr ---\n{err[-6000:]}") from None
    proc = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}\nexit {proc.returncode}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def pretrain(run_dir: Path, *overrides: str, nproc: int = 1, kind: str = "torchrun", cache: Path | None = None,
             ds_config: str | None = None, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    args = [*TINY, f"run_dir={run_dir}", *overrides]
    if cache:
        args.append(f"data.cache_dir={cache}")
    if ds_config and kind != "accelerate":
        args.append(f"ds_config={ds_config}")
    return run([*launcher(nproc, kind, ds_config), PRETRAIN, *args], timeout=timeout, check=check)


def pretrain_many(runs: list[list[str]], nproc: int, cache: Path, workdir: Path, timeout: float = 1200,
                  dump_logits: bool = False) -> None:
    """Several recipe runs in one torchrun launch (see tests/workers/run_recipe_many.py)."""
    spec = Path(workdir) / "runs.json"
    spec.write_text(json.dumps([[*TINY, f"data.cache_dir={cache}", *r] for r in runs]))
    run([*launcher(nproc), str(REPO / "tests" / "workers" / "run_recipe_many.py"), PRETRAIN, str(spec),
         *(["--dump-logits"] if dump_logits else [])], timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}


def assert_close(a: dict, b: dict, rel: float) -> None:
    assert a.keys() == b.keys(), f"steps differ: {sorted(a)} vs {sorted(b)}"
    worst = max(abs(a[k] - b[k]) / abs(b[k]) for k in a)
    assert worst <= rel, f"max relative loss difference {worst:.3g} > {rel}: {a} vs {b}"


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank at once (no process gets to clean up), then reap the launcher."""
    kill_tree(proc)
    proc.wait()
