"""The main job's promises: rank equivalence (A3), kill -9 + resume (A4), the data cache (A5)."""
import subprocess
import time

import pytest

from launch_util import PRETRAIN, REPO, TINY, assert_close, env, kill_all, launcher, losses, metrics, pretrain


@pytest.fixture(scope="module")
def cache(tmp_path_factory, data_dir):
    return tmp_path_factory.mktemp("cache")


def test_two_rank_zero2_equals_one_process(tmp_path, cache):
    """A3: accelerate launch, 2 CPU ranks, DeepSpeed ZeRO-2 == 1 process, same global batch of 8."""
    steps = ["train.max_steps=20"]
    pretrain(tmp_path / "one", *steps, "train.micro_batch_size=8", kind="python", cache=cache)
    pretrain(tmp_path / "two", *steps, "train.micro_batch_size=4", nproc=2, kind="accelerate",
             ds_config="ds_configs/zero2.json", cache=cache)
    two = metrics(tmp_path / "two")
    # Two ranks really ran (each reported its memory) and together saw the whole global batch:
    # had both been "rank 0 of 1" they would have trained on the same 4 windows and the losses would differ.
    assert len(two[0]["peak_mem_mb_per_rank"]) == 2
    assert two[0]["tokens_seen"] == metrics(tmp_path / "one")[0]["tokens_seen"] == 8 * 32
    assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), rel=1e-4)


def _run_until_checkpoint_then_kill(run_dir, args, nproc, ckpt_step):
    cmd = [*launcher(nproc, "torchrun" if nproc > 1 else "python"), PRETRAIN, *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / f"step_{ckpt_step}").is_dir():
        assert proc.poll() is None, f"run ended before its checkpoint: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    kill_all(proc)  # the launcher and every rank, no chance to clean up
    done = max(losses(run_dir))
    assert done < int([a for a in args if a.startswith("train.max_steps=")][0].split("=")[1]), "killed too late"
    return done


# The 2-rank ZeRO-2 case (~60 s) runs with -m slow (CI runs it; test_kill_anywhere kills 2-rank runs
# at every phase there too).
@pytest.mark.parametrize("nproc,extra", [(1, []), pytest.param(2, ["ds_config=ds_configs/zero2.json"], marks=pytest.mark.slow)],
                         ids=["single-process", "zero2-2ranks"])
def test_sigkill_then_resume_auto_matches_uninterrupted(tmp_path, cache, nproc, extra):
    """A4: killed after a checkpoint, `resume=auto` continues with the same losses (dropout on: RNG restored)."""
    args = [*TINY, "model.dropout=0.1", "train.max_steps=150", "train.checkpoint_every=10", "train.micro_batch_size=4",
            f"data.cache_dir={cache}", *extra]
    ref = tmp_path / "ref"
    pretrain(ref, *args[len(TINY):], nproc=nproc, kind="torchrun" if nproc > 1 else "python")
    run_dir = tmp_path / "killed"
    args = [*args, f"run_dir={run_dir}"]
    _run_until_checkpoint_then_kill(run_dir, args, nproc, ckpt_step=10)
    resumed_args = [a if a != "resume=none" else "resume=auto" for a in args]
    subprocess.run([*launcher(nproc, "torchrun" if nproc > 1 else "python"), PRETRAIN, *resumed_args],
                   cwd=REPO, env=env(), check=True, capture_output=True, timeout=600)
    got, want = losses(run_dir), losses(ref)
    after = {s: v for s, v in want.items() if s > 10}
    assert_close({s: got[s] for s in after}, after, rel=1e-6)


def test_second_run_hits_the_data_cache(tmp_path, cache):
    """A5: the same corpus and settings again: no tokenizer training, no tokenization (the source files are
    unchanged, so the corpus is not even read), and the log says so."""
    first = pretrain(tmp_path / "a", "train.max_steps=1", kind="python", cache=tmp_path / "fresh")
    second = pretrain(tmp_path / "b", "train.max_steps=1", kind="python", cache=tmp_path / "fresh")
    assert "packed" in first.stderr and "trained tokenizer" in first.stderr and "data cache hit" not in first.stderr
    assert "data cache hit (source unchanged)" in second.stderr
    assert "packed" not in second.stderr.replace("data cache hit", "") and "trained tokenizer" not in second.stderr


def test_plain_python_runs_deepspeed_and_fsdp_on_one_process(tmp_path, cache):
    """`python recipes/pretrain_gpt.py ds_config=...` without any launcher (one GPU, or a laptop):
    DeepSpeed and FSDP need a process group, which the loop forms for one process by itself; the
    losses are the plain single-process run's."""
    ref = tmp_path / "plain"
    pretrain(ref, "train.max_steps=3", kind="python", cache=cache)
    for name, extra in (("zero3", "ds_config=ds_configs/zero3.json"), ("fsdp", "fsdp=full_shard")):
        pretrain(tmp_path / name, "train.max_steps=3", extra, kind="python", cache=cache)
        assert metrics(tmp_path / name)[0]["step"] == 1
        assert_close(losses(tmp_path / name), losses(ref), rel=1e-5)
