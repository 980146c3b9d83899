"""Resume on another world size: a checkpoint written by 2 ranks continues on 1 and on 4 ranks
(same global batch of 8: 2 x 4, 1 x 8, 4 x 2) with the losses of the uninterrupted 2-rank run.

How each backend reshards:
- plain/DDP and FSDP: torch.distributed.checkpoint (DCP) stores every tensor with its global
  shape and reshards on load by itself (zerokit/backends/dcp.py);
- DeepSpeed ZeRO-0: the optimizer state is not partitioned; DeepSpeed's own checkpoint loads as is;
- DeepSpeed ZeRO 1-3 at another data-parallel size: the first rank to take a file lock converts
  `<ckpt>/deepspeed` once with DeepSpeed's ds_to_universal into `<ckpt>/deepspeed_universal`
  (temp folder + rename; the other ranks wait on the lock), and every
  rank loads it with the engine's `load_universal_checkpoint` switched on for that load only
  (DeepSpeedBackend.load). Same size: the plain DeepSpeed checkpoint, no conversion.
The data loader's position is one global sample count, so the resumed run reads the same samples;
RNG states are restored only at the same world size, hence dropout 0 (launch_util.TINY).
"""
import json

import pytest

from launch_util import assert_close, losses, metrics, pretrain

STEPS, CKPT = 8, 4
GLOBAL_BATCH = 8
ENGINES = {
    "fsdp_full_shard": ["fsdp=full_shard"],
    "zero0": ["ds_config=ds_configs/zero0.json"],
    "zero2": ["ds_config=ds_configs/zero2.json"],
    "zero3": ["ds_config=ds_configs/zero3.json"],
}
# The default suite runs FSDP 2->1 (DCP resharding); the rest, DeepSpeed's universal conversion among them
# (~25-40 s each), run with -m slow, which .ci/run also runs.
slow = pytest.mark.slow
CASES = [pytest.param(e, n, marks=[] if (e, n) == ("fsdp_full_shard", 1) else [slow],
                      id=f"{e}-2to{n}")
         for e, n in [("fsdp_full_shard", 1), ("fsdp_full_shard", 4), ("zero0", 4),
                      ("zero2", 1), ("zero2", 4), ("zero3", 1), ("zero3", 4)]]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, data_dir):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    """engine -> the uninterrupted 2-rank run (which also wrote the step-4 checkpoint); run once per engine."""
    done = {}

    def get(engine: str):
        if engine not in done:
            run_dir = tmp_path_factory.mktemp(f"ref_{engine}")
            pretrain(run_dir, f"train.max_steps={STEPS}", f"train.checkpoint_every={CKPT}",
                     f"train.micro_batch_size={GLOBAL_BATCH // 2}", *ENGINES[engine], nproc=2, cache=cache)
            done[engine] = run_dir
        return done[engine]
    return get


@pytest.mark.parametrize("engine,nproc", CASES)
def test_resume_on_another_world_size(engine, nproc, reference, cache, tmp_path):
    ref = reference(engine)
    ckpt = ref / "checkpoints" / f"step_{CKPT}"
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    pretrain(tmp_path, f"train.max_steps={STEPS}", f"train.micro_batch_size={GLOBAL_BATCH // nproc}",
             f"resume={ckpt}", *ENGINES[engine], nproc=nproc, cache=cache)
    got = metrics(tmp_path)
    assert len(got[0]["peak_mem_mb_per_rank"]) == nproc, "the resumed run did not have the requested ranks"
    assert got[0]["step"] == CKPT + 1 and got[0]["tokens_seen"] == GLOBAL_BATCH * 32 * (CKPT + 1)
    want = {s: v for s, v in losses(ref).items() if s > CKPT}
    assert_close(losses(tmp_path), want, rel=1e-5)
    # The mechanism in use: ZeRO 1-3 needed the universal conversion; ZeRO-0 and DCP did not.
    universal = ckpt / "deepspeed_universal"
    if engine in ("zero2", "zero3"):
        assert (universal / "zero" / "optimizer_state.pt").is_file()
        assert not list(ckpt.glob("deepspeed_universal.tmp*")), "conversion left its temp folder behind"
    else:
        assert not universal.exists()
