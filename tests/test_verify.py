"""The estimator against real DeepSpeed steps on 2 CPU ranks (E1): ZeRO 0-3 x checkpointing x micro-batch
x {full, LoRA}. Model-state terms exact, the whole per-rank peak within 15% (allocator-level counting).
Also `zerokit plan --verify` end to end."""
import pytest

from lab_fixtures import VERIFY_SEQ as SEQ
from lab_fixtures import verify_model_dir  # noqa: F401 (a fixture)
from zerokit.errors import UsageError
from zerokit.lab import planner
from zerokit.lab.verify import PEAK_TOLERANCE, STATE_TOLERANCE, failures, parse_points, run_points

# 18 points: every stage with {no ckpt, mb 1, full}, {ckpt, mb 4, full}, {no ckpt, mb 4, LoRA}, {ckpt, mb 1, LoRA}
POINTS = [dict(stage=s, grad_ckpt=c, micro_batch=b, peft=f) for s in (0, 1, 2, 3)
          for c, b, f in (("none", 1, "none"), ("full", 4, "none"), ("none", 4, "lora"), ("full", 1, "lora"))]
POINTS += [dict(stage=s, grad_ckpt="full", micro_batch=4, peft="lora") for s in (0, 3)]  # like-for-like ckpt pairs


@pytest.mark.slow  # ~70 s (.ci/run runs the slow cases; bench/verify_cpu.sh runs 32 points)
def test_estimate_matches_real_zero_steps_on_two_ranks(verify_model_dir):
    rows = run_points(verify_model_dir, POINTS, world_size=2, seq=SEQ, timed_steps=0)
    assert len(rows) == len(POINTS)
    assert failures(rows, PEAK_TOLERANCE["cpu"]) == []
    for r in rows:
        assert all(abs(s["rel_err"]) <= STATE_TOLERANCE for s in r["states"].values()), r["states"]
        assert abs(r["peak_rel_err"]) <= 0.15, (r["point"], r["measured_peak"], r["estimate_items"])
    # The numbers behind the agreement: ZeRO really partitioned what the formulas say.
    by = {(r["point"]["stage"], r["point"]["grad_ckpt"], r["point"]["micro_batch"], r["point"]["peft"]): r
          for r in rows}
    full = [by[(s, "none", 1, "none")]["states"] for s in (0, 1, 2, 3)]
    m = lambda st, k: st[k]["measured"]
    assert m(full[0], "master_weights") == 0 and m(full[1], "master_weights") > 0
    assert m(full[1], "optimizer_state") == pytest.approx(m(full[0], "optimizer_state") / 2, rel=0.01)
    assert m(full[2], "gradients") < m(full[1], "gradients")
    assert m(full[3], "weights") < 0.7 * m(full[2], "weights")
    # checkpointing lowers the measured peak, like for like: the same stage and micro-batch, LoRA with and
    # without it (the estimate says by how much; the measurement must agree on the direction and the size)
    for s in (0, 3):
        none, full = by[(s, "none", 4, "lora")], by[(s, "full", 4, "lora")]
        assert full["measured_peak"] < none["measured_peak"], (s, none["measured_peak"], full["measured_peak"])
        saved, predicted = none["measured_peak"] - full["measured_peak"], none["estimate_peak"] - full["estimate_peak"]
        assert saved == pytest.approx(predicted, rel=0.25), (s, saved, predicted)


def test_parse_points_errors_name_the_fix():
    assert len(parse_points(["stage=0,3", "micro_batch=1,2", "peft=none,lora"])) == 8
    with pytest.raises(UsageError, match="key one of"):
        parse_points(["zero=1"])
    with pytest.raises(UsageError, match="positive integers"):
        parse_points(["micro_batch=0"])
    with pytest.raises(UsageError, match="needs --stage 3"):
        parse_points(["stage=2", "offload=params"])


@pytest.mark.slow  # ~40 s: two more real 2-rank runs
def test_plan_verify_runs_the_top_choices(verify_model_dir, capsys):
    # 4GB: the GPU estimate adds a 1 GiB CUDA context to every candidate
    assert planner.plan_main(["--model", verify_model_dir, "--gpus", "2", "--gpu-mem", "4GB", "--seq", "64",
                              "--global-batch", "1024", "--precision", "fp32", "--verify", "2",
                              "--out", "/dev/null"]) == 0
    out = capsys.readouterr().out
    assert "verify: a window of 2 micro-batches of the top 2 on 2 local rank(s)" in out
    rows = [line for line in out.splitlines() if line.strip().startswith("ZeRO-") and "%" in line]
    assert len(rows) == 2
    for line in rows:
        diff = float(line.split("%")[0].split()[-1])
        assert abs(diff) <= 15, line


def test_plan_verify_refuses_what_it_cannot_run(verify_model_dir):
    with pytest.raises(UsageError, match="this node only"):
        planner.plan_main(["--model", verify_model_dir, "--gpus", "2", "--nodes", "2", "--gpu-mem", "1GB", "--seq", "64",
                           "--verify", "1", "--out", "/dev/null"])
