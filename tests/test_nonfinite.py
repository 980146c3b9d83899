"""train.nonfinite: a NaN loss (one batch poisoned on one rank, tests/nonfinite_worker.py) is skipped
exactly, or stops the run with a diagnosis and a checkpoint of the last good state; a diverging
learning rate stops cleanly; metrics.jsonl stays strict JSON throughout.

References are independent of the guard: a skipped update is compared with a run whose data stream
simply lacks that batch, a stopped-and-resumed run with a run that never met the poison.
"""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from launch_util import PRETRAIN, REPO, TINY, launcher, run
from zerokit.metrics import MetricsLogger

WORKER = REPO / "tests" / "nonfinite_worker.py"
STEPS, BAD = 5, 3  # the poisoned step (1-based)
# Constant lr (the cosine floor is the peak): a run that skips step k then matches one without batch k.
FLAT = ["train.warmup_steps=0", "train.lr=1e-3", "train.min_lr=1e-3", f"train.max_steps={STEPS}"]
ENGINES = {"plain": [], "deepspeed-zero0": ["ds_config=ds_configs/zero0.json"],
           "deepspeed-zero2": ["ds_config=ds_configs/zero2.json"], "deepspeed-zero3": ["ds_config=ds_configs/zero3.json"],
           "fsdp": ["fsdp=full_shard"]}


def _reject(constant):
    raise ValueError(f"bare {constant} in metrics.jsonl")


def strict_lines(path: Path) -> list[dict]:
    """Every line of a JSONL file as strict JSON (NaN/Infinity, which Python would accept, fail)."""
    return [json.loads(line, parse_constant=_reject) for line in Path(path).read_text().splitlines()]


def launch(tmp_path: Path, runs: list[dict], nproc: int = 1):
    spec = tmp_path / f"runs{len(list(tmp_path.glob('runs*.json')))}.json"
    spec.write_text(json.dumps(runs))
    cmd = [sys.executable] if nproc == 1 else launcher(nproc)
    return run([*cmd, str(WORKER), str(spec)], check=False, timeout=900)


def overrides(run_dir: Path, cache: Path, engine: str, *extra: str) -> list[str]:
    return [*TINY, *FLAT, *ENGINES[engine], f"run_dir={run_dir}", f"data.cache_dir={cache}", *extra]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def check_skip(tmp_path: Path, cache: Path, engine: str, nproc: int, poison_rank: int) -> None:
    a, b = tmp_path / "skip", tmp_path / "dropped"
    proc = launch(tmp_path, [
        {"overrides": overrides(a, cache, engine, "train.nonfinite=skip"), "poison_step": BAD,
         "poison_rank": poison_rank, "weights": str(a / "w.pt")},
        {"overrides": overrides(b, cache, engine, f"train.max_steps={STEPS - 1}"), "drop_step": BAD,
         "weights": str(b / "w.pt")}], nproc)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [r for r in strict_lines(a / "metrics.jsonl") if "loss" in r]
    assert [r["skipped_steps"] for r in records] == [0] * (BAD - 1) + [1] * (STEPS - BAD + 1)
    assert records[BAD - 1]["loss"] is None and all(math.isfinite(r["loss"]) for r in records if r["step"] != BAD)
    assert json.loads((a / "summary.json").read_text())["skipped_steps"] == 1
    skipped, reference = torch.load(a / "w.pt"), torch.load(b / "w.pt")
    assert skipped.keys() == reference.keys()
    for name in skipped:
        assert torch.isfinite(skipped[name]).all(), name
        torch.testing.assert_close(skipped[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)


def check_stop(tmp_path: Path, cache: Path, engine: str, nproc: int, poison_rank: int) -> Path:
    run_dir = tmp_path / "stop"
    proc = launch(tmp_path, [{"overrides": overrides(run_dir, cache, engine), "poison_step": BAD,
                              "poison_rank": poison_rank}], nproc)
    assert proc.returncode != 0, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and all(e == errors[0] for e in errors), proc.stderr[-4000:]  # every rank says the same
    line = errors[0]
    assert f"step {BAD}: non-finite loss" in line and "first non-finite gradient: transformer.wte.weight" in line, line
    assert f"samples_seen={(BAD - 1) * 8 * nproc}" in line, line  # where the data stood before the bad batch
    ckpt = run_dir / "checkpoints" / f"step_{BAD - 1}"
    assert str(ckpt) in line, line
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == BAD - 1 and state["loader"]["samples_seen"] == (BAD - 1) * 8 * nproc
    assert not (run_dir / "checkpoints" / f"step_{BAD}").exists()
    last = strict_lines(run_dir / "metrics.jsonl")[-1]
    assert last["step"] == BAD and last["parameter"] == "transformer.wte.weight", last
    return run_dir


def test_skip_drops_exactly_that_update(tmp_path, cache):
    check_skip(tmp_path, cache, "plain", nproc=1, poison_rank=0)


def test_stop_names_the_step_parameter_and_data_position(tmp_path, cache):
    check_stop(tmp_path, cache, "plain", nproc=1, poison_rank=0)


@pytest.mark.slow
def test_stop_checkpoint_resumes_like_a_clean_run(tmp_path, cache):
    """The checkpoint written at the stop is the state before the bad step: resumed (without the
    poison) it finishes with exactly the weights of a run that never met the poison."""
    run_dir = check_stop(tmp_path, cache, "plain", nproc=1, poison_rank=0)
    clean = tmp_path / "clean"
    proc = launch(tmp_path, [
        {"overrides": overrides(run_dir, cache, "plain", "resume=auto"), "weights": str(run_dir / "w.pt")},
        {"overrides": overrides(clean, cache, "plain"), "weights": str(clean / "w.pt")}])
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed, reference = torch.load(run_dir / "w.pt"), torch.load(clean / "w.pt")
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)


def test_diverging_learning_rate_stops_cleanly(tmp_path, cache):
    """lr 1e9 through the real recipe: one error line, exit 2, no traceback, strict JSON, a checkpoint."""
    run_dir = tmp_path / "run"
    proc = run([sys.executable, PRETRAIN, *TINY, f"run_dir={run_dir}", f"data.cache_dir={cache}", "train.lr=1e9",
                "train.warmup_steps=0", "train.max_steps=30"], check=False, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr and "non-finite" in errors[0], errors[0]
    lines = strict_lines(run_dir / "metrics.jsonl")
    stopped = lines[-1]["step"]
    assert stopped < 30 and (run_dir / "checkpoints" / f"step_{stopped - 1}" / "trainer_state.json").is_file()
    assert not (run_dir / "sample.txt").exists()  # it stopped before sampling from a broken model


def test_metrics_lines_are_strict_json(tmp_path):
    logger = MetricsLogger(tmp_path, "none", {}, enabled=True)
    logger.log({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "per_rank": [1.0, float("-inf")]})
    logger.close()
    assert strict_lines(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": None, "grad_norm": None, "per_rank": [1.0, None]}]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["deepspeed-zero0", "deepspeed-zero2", "deepspeed-zero3", "fsdp"])
def test_two_ranks_skip_agree(tmp_path, cache, engine):
    """Only rank 1's loss is poisoned: both ranks skip the same update (rank 0, which logs, saw a finite loss)."""
    check_skip(tmp_path, cache, engine, nproc=2, poison_rank=1)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["deepspeed-zero2", "fsdp"])
def test_two_ranks_stop_agree(tmp_path, cache, engine):
    check_stop(tmp_path, cache, engine, nproc=2, poison_rank=1)
