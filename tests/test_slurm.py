"""The generated batch scripts on a real SLURM cluster (pytest -m slurm; root; installs Debian's slurm).

tests/slurm/cluster.sh brings up a throw-away cluster of two emulated nodes, n1 and n2, on this machine,
once per session, and takes it down afterwards. Every script submitted here is the byte-for-byte output
of `zerokit slurm`, and the recipe runs for real (gpt-tiny, fp32, gloo on CPU):
  - the script SLURM stores is what the CLI wrote;
  - USR1 at the batch shell reaches every rank on every node (a probe recipe, 2 nodes x 2 ranks), the job
    requeues itself and the second attempt runs;
  - pretraining on 2 nodes x 1 rank gives the same per-step losses as one node with 2 ranks (torchrun);
  - pretraining preempted mid-run with USR1 checkpoints, requeues, resumes and ends where an
    uninterrupted run ends.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from slurm_cluster import BIN, TERMINAL, Slurm  # the cluster itself: conftest.py's session fixture `slurm`

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "tests" / "slurm" / "signal_probe.py"

# Tiny, deterministic (fp32, no dropout) and slow enough to be signalled mid-run: ~0.15 s per step on
# 2 CPU ranks here, so MAX_STEPS leaves several seconds between "step 3 logged" and the end.
MAX_STEPS = 60
SETTINGS = ["model.preset=gpt-tiny", "model.dropout=0.0", "data.block_size=32", "data.vocab_size=512",
            "data.eval_batches=4", "train.precision=fp32", f"train.max_steps={MAX_STEPS}",
            "train.micro_batch_size=4", "train.grad_accum=1", "train.eval_every=0", "train.log_every=1",
            "train.checkpoint_every=0", "train.warmup_steps=2", "train.lr=3e-3", "train.min_lr=3e-4",
            "train.seed=1337", "sample.max_new_tokens=8",
            # Step-count mode and one thread per rank in every layout: the recipe's defaults are a time budget
            # (its horizon would follow the clock) and threads from the CPU affinity, which a SLURM job step
            # (--cpus-per-task 1) and torchrun on this machine see differently; 1 vs 2 threads change the
            # matmul summation order, and the runs drift apart by 1e-5 within 60 steps at lr 3e-3.
            "train.max_minutes=0", "train.cpu_threads=1", "train.schedule=cosine"]
CLI_ARGS = ["--nodes", "2", "--gpus-per-node", "0", "--time", "00:10:00", "--cpus-per-task", "1"]


def zerokit_slurm(slurm: Slurm, *argv, cwd=REPO) -> subprocess.CompletedProcess:
    """The real CLI entry point, `zerokit slurm ...`."""
    return slurm.run(BIN / "zerokit", "slurm", *argv, cwd=cwd)


@pytest.fixture(scope="module")
def pretrain_script(slurm, tmp_path_factory) -> Path:
    """`zerokit slurm` for pretrain_gpt on 2 CPU nodes, as stdout and as -o FILE (must be identical)."""
    path = tmp_path_factory.mktemp("scripts") / "pretrain_gpt.sbatch"
    argv = [*CLI_ARGS, "recipes/pretrain_gpt.py", "--", *SETTINGS]
    stdout = zerokit_slurm(slurm, *argv).stdout
    zerokit_slurm(slurm, "-o", path, *argv)
    assert path.read_text() == stdout
    check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("zerokit-cache")  # tokenizer + token shards, shared by all runs here


@pytest.fixture(scope="module")
def reference(slurm, cache, tmp_path_factory) -> Path:
    """One node, 2 ranks: `launch/torchrun.sh 2 recipes/pretrain_gpt.py ...` with the same settings."""
    run_dir = tmp_path_factory.mktemp("reference")
    slurm.run("bash", REPO / "launch" / "torchrun.sh", "2", "recipes/pretrain_gpt.py", *SETTINGS,
              f"data.cache_dir={cache}", f"run_dir={run_dir}", "resume=none", timeout=600)
    return run_dir


def loss_rows(run_dir: Path) -> list[tuple[int, float]]:
    """(step, training loss) for each metrics.jsonl line that has both, in file order."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["loss"]) for row in rows if "step" in row and "loss" in row]


def losses(run_dir: Path) -> dict[int, float]:
    return dict(loss_rows(run_dir))


def assert_close(a: float, b: float, what: str, rel: float = 1e-5):
    assert math.isclose(a, b, rel_tol=rel), f"{what}: {a!r} vs {b!r} (relative tolerance {rel})"


def submit(slurm: Slurm, script: Path, log_dir: Path, *args, wait: bool = False) -> tuple[int, Path]:
    """sbatch SCRIPT [key=value...] from the checkout, the log going to log_dir; returns (job id, log)."""
    cmd = ["sbatch", "--parsable", f"--output={log_dir}/job-%j.out", *(["--wait"] if wait else []), script, *args]
    proc = slurm.run(*cmd, timeout=600, check=False)
    job_id = int(proc.stdout.split()[0].split(";")[0]) if proc.stdout.strip() else None
    if job_id is None:
        pytest.fail(f"sbatch failed: {proc.stderr}\n{slurm.logs()}")
    log = log_dir / f"job-{job_id}.out"
    if wait and proc.returncode != 0:
        pytest.fail(f"job {job_id} failed (sbatch --wait exit {proc.returncode})\n"
                    f"{log.read_text() if log.exists() else ''}\n{slurm.logs()}")
    return job_id, log


def test_slurm_runs_exactly_what_the_cli_wrote(slurm, pretrain_script):
    """D2: the script SLURM stores for the job is byte-identical to `zerokit slurm` output."""
    job_id = int(slurm.run("sbatch", "--parsable", "--hold", pretrain_script).stdout.split(";")[0])
    try:
        stored = slurm.run("scontrol", "write", "batch_script", job_id, "-").stdout
    finally:
        slurm.run("scancel", job_id)
    assert stored == pretrain_script.read_text()


def test_usr1_reaches_every_rank_and_the_job_requeues(slurm, tmp_path):
    """2 nodes x 2 ranks (the test nodes' fake gpu:2 GRES): scancel --batch --signal=USR1 at the batch shell
    must reach all 4 ranks without killing torchrun; the job requeues and attempt 2 runs."""
    run_dir = tmp_path / "run"
    # Absolute recipe path, so this job can be submitted (zerokit slurm --submit) from tmp_path.
    out = zerokit_slurm(slurm, "--nodes", "2", "--gpus-per-node", "2", "--time", "00:10:00", "--cpus-per-task",
                        "1", "--submit", "-o", tmp_path / "probe.sbatch", PROBE, "--", f"run_dir={run_dir}",
                        cwd=tmp_path)
    job_id = int(re.search(r"Submitted batch job (\d+)", out.stdout).group(1))
    log = tmp_path / f"signal_probe-{job_id}.out"

    deadline = time.monotonic() + 120
    while len(list(run_dir.glob("rank*.attempt0.json"))) < 4:
        if time.monotonic() > deadline or slurm.job(job_id).get("JobState") in TERMINAL:
            slurm.run("scancel", job_id, check=False)
            pytest.fail(f"4 probe ranks did not start\n{log.read_text() if log.exists() else ''}\n{slurm.logs()}")
        time.sleep(0.2)
    slurm.run("scancel", "--batch", "--signal=USR1", job_id)
    final = slurm.wait(job_id, timeout=180)
    text = log.read_text()
    assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", f"{final}\n{text}"
    assert final["Restarts"] == "1", text

    assert sorted(p.name for p in run_dir.glob("usr1.*")) == ["usr1.0", "usr1.1", "usr1.2", "usr1.3"], text
    first = {r: json.loads((run_dir / f"rank{r}.attempt0.json").read_text()) for r in range(4)}
    for r, info in first.items():
        env = info["env"]
        assert env["WORLD_SIZE"] == "4" and env["LOCAL_WORLD_SIZE"] == "2"
        assert env["MASTER_ADDR"] == "n1" and env["MASTER_PORT"] == str(15000 + job_id % 15000)
        assert env["SLURMD_NODENAME"] == ("n1" if r < 2 else "n2") and env["GROUP_RANK"] == str(r // 2)
        assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and env["HF_HUB_OFFLINE"] == "1"
        assert info["args"] == {"run_dir": str(run_dir), "resume": "auto"}
    second = [json.loads((run_dir / f"rank{r}.attempt1.json").read_text()) for r in range(4)]
    assert all(info["env"]["SLURM_RESTART_COUNT"] == "1" for info in second)
    assert not (run_dir / "PREEMPTED").exists()  # the batch script cleared it before attempt 2
    assert "USR1: asking every rank" in text and "requeueing job" in text and ", attempt 2:" in text, text
    assert "User defined signal" not in text, text  # no process died of the forwarded USR1


def test_two_nodes_match_one_node_step_by_step(slurm, pretrain_script, reference, cache, tmp_path):
    """2 nodes x 1 rank under sbatch --wait == 1 node x 2 ranks (torchrun), every step's loss."""
    run_dir = tmp_path / "run"
    job_id, log = submit(slurm, pretrain_script, tmp_path, f"run_dir={run_dir}", f"data.cache_dir={cache}",
                         wait=True)
    ref, got = losses(reference), losses(run_dir)
    assert sorted(got) == sorted(ref) == list(range(1, MAX_STEPS + 1)), log.read_text()[-3000:]
    for step in ref:
        assert_close(got[step], ref[step], f"loss at step {step}")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert_close(summary["val_loss"], json.loads((reference / "summary.json").read_text())["val_loss"], "val_loss")


def test_preempted_run_requeues_resumes_and_ends_like_an_uninterrupted_one(slurm, pretrain_script, reference,
                                                                             cache, tmp_path):
    run_dir = tmp_path / "run"
    job_id, log = submit(slurm, pretrain_script, tmp_path, f"run_dir={run_dir}", f"data.cache_dir={cache}")
    # Signal once training has visibly started (a few steps in metrics.jsonl), as SLURM would before the limit.
    deadline = time.monotonic() + 240
    while not ((run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= 3):
        if time.monotonic() > deadline or slurm.job(job_id).get("JobState") in TERMINAL:
            slurm.run("scancel", job_id, check=False)
            pytest.fail(f"no training progress seen\n{log.read_text() if log.exists() else ''}\n{slurm.logs()}")
        time.sleep(0.2)
    slurm.run("scancel", "--batch", "--signal=USR1", job_id)
    final = slurm.wait(job_id, timeout=300)
    text = log.read_text()
    assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", f"{final}\n{text[-4000:]}"

    stopped = re.search(r"stopped early at step (\d+); requeueing", text)
    assert stopped, f"the job was not preempted (did it finish before the signal landed?)\n{text[-4000:]}"
    step = int(stopped.group(1))
    print(f"\npreempted at step {step} of {MAX_STEPS}")
    assert 3 <= step < MAX_STEPS
    assert (run_dir / "checkpoints" / f"step_{step}").is_dir(), sorted(os.listdir(run_dir))
    assert final["Restarts"] == "1" and ", attempt 2:" in text, text[-4000:]
    assert not (run_dir / "PREEMPTED").exists()

    ref, got = losses(reference), losses(run_dir)
    steps = [s for s, _ in loss_rows(run_dir)]
    assert steps == list(range(1, MAX_STEPS + 1)), f"each step logged once, in order, across both attempts: {steps}"
    for s in ref:
        assert_close(got[s], ref[s], f"loss at step {s} (preempted at {step})")
    assert_close(json.loads((run_dir / "summary.json").read_text())["val_loss"],
                 json.loads((reference / "summary.json").read_text())["val_loss"], "final val_loss")
