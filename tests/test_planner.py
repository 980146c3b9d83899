"""zerokit plan: feasibility against the ZeRO formulas, the cost model's ranking against real steps,
the DeepSpeed JSON and launch command."""
import json
from dataclasses import replace

import pytest

from lab_fixtures import LLAMA_7B, VERIFY_SEQ, one_thread, verify_model_dir  # noqa: F401 (fixtures)
from zerokit.lab import planner
from zerokit.lab.build import resolve_config
from zerokit.lab.verify import GRAD_ACCUM, run_points
from zerokit.lab.zero_formula import model_stats

GiB = 2**30
# seq 1024 keeps the meta probes of the 7B shape cheap (same code paths as 4096).
SEQ = 1024
KW = dict(seq=SEQ, precision="bf16", ckpt_modes=("none", "full"), global_tokens=2**19)


@pytest.fixture(scope="module")
def psi():
    return model_stats(LLAMA_7B).params


def test_7b_full_finetune_on_8x80gb(psi):
    fits, misses = planner.plan(LLAMA_7B, gpus=8, gpu_mem=80 * GiB, host_mem=512 * GiB, **KW)
    # 16 psi ~ 108 GB of model states: no stage-0 (plain data parallel) configuration fits 80 GB
    assert 16 * psi > 80 * GiB
    assert not [c for c in fits if c.stage == 0]
    assert [c for c in misses if c.stage == 0]
    # stage 3 over 8 ranks holds 16 psi / 8 ~ 13.5 GB of model states per rank: fits, without offload
    st3 = [c for c in fits if c.stage == 3 and c.offload == "none"]
    assert st3
    assert st3[0].est.weights + st3[0].est.optimizer_state + st3[0].est.master_weights == pytest.approx(14 * psi / 8, rel=0.01)
    assert fits[0].tokens_per_s == max(c.tokens_per_s for c in fits)
    assert all(c.est.total <= planner.USABLE_FRACTION * 80 * GiB for c in fits)


def test_7b_on_one_24gb_gpu_needs_offload_and_host_memory(psi):
    fits, _ = planner.plan(LLAMA_7B, gpus=1, gpu_mem=24 * GiB, host_mem=512 * GiB, **KW)
    assert fits and all(c.offload != "none" for c in fits)  # 16 psi on one GPU: only with offload
    assert any(c.offload == "all" for c in fits)  # optimizer state and parameters on the host
    # offloaded master + Adam + fp32 grads are 16 bytes per param on the host (~100 GiB): 64 GB is too little
    none, misses = planner.plan(LLAMA_7B, gpus=1, gpu_mem=24 * GiB, host_mem=64 * GiB, **KW)
    assert not none
    assert all(c.est.host_per_node > 64 * GiB * planner.USABLE_FRACTION for c in misses
               if c.offload in ("optimizer", "all"))


@pytest.mark.slow  # ~60 s of real 2-rank steps; CI runs -m slow
def test_cost_model_ranks_real_steps_as_they_run(verify_model_dir):
    """The planner's cost model against measured step times of real ZeRO steps on 2 CPU ranks
    (`zerokit verify`'s runner). With the compute rate calibrated on one configuration, every pair it
    predicts at least 1.5x apart in throughput must have run in that order. Closer pairs are left out:
    three timed steps on a shared 2-core machine vary by 20-30%, and at this size the recompute of
    activation checkpointing costs less than the model's 4/3 (measured here: 0.40 s with it, 0.44 s
    without, predicted 0.58 s), so a tighter check would fail on noise, not on the ranking."""
    points = [dict(stage=0, grad_ckpt="none", micro_batch=4), dict(stage=0, grad_ckpt="full", micro_batch=4),
              dict(stage=0, grad_ckpt="full", micro_batch=1)]
    rows = run_points(verify_model_dir, points, world_size=2, seq=VERIFY_SEQ, timed_steps=3)
    config = resolve_config(verify_model_dir)
    stats = model_stats(config)

    def predict(p, hw):
        return planner.step_time(config, stats, world_size=2, nodes=1, stage=p["stage"], offload="none",
                                 grad_ckpt=p["grad_ckpt"], micro_batch=p["micro_batch"], grad_accum=GRAD_ACCUM,
                                 seq=VERIFY_SEQ, precision="fp32", peft="none", hw=hw)
    # Two CPU ranks as the hardware: FLOP/s calibrated on the first point (gloo's all-reduce of 2M
    # params takes milliseconds, so bandwidth is set high: these steps are compute and latency).
    unit = replace(planner.HARDWARE["h100"], tf32_flops=1.0, mfu=1.0, intra_bw=1e12)
    t0 = predict(points[0], unit)
    cpu = replace(unit, tf32_flops=t0["compute"] / (rows[0]["step_s"] - t0["latency"]))
    predicted = [predict(p, cpu)["total"] for p in points]
    measured = [r["step_s"] for r in rows]
    tokens = [p["micro_batch"] * VERIFY_SEQ * 2 * GRAD_ACCUM for p in points]
    pairs = [(i, j) for i in range(3) for j in range(3)
             if tokens[i] / predicted[i] > 1.5 * tokens[j] / predicted[j]]
    assert pairs, predicted  # the configurations are far enough apart to rank
    for i, j in pairs:
        assert tokens[i] / measured[i] > tokens[j] / measured[j], (points[i], points[j], predicted, measured)


def test_plan_main_writes_deepspeed_json_and_launch_command(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = planner.plan_main(["--model", "gpt-tiny", "--gpus", "2", "--gpu-mem", "4GB", "--host-mem", "16GB",
                            "--seq", "64", "--global-batch", "4096", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    ds = json.loads(out.read_text())
    z = ds["zero_optimization"]
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
    assert ds["bf16"]["enabled"] and z["stage"] in (0, 1, 2, 3)
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2 * 64 >= 4096
    launch = text.split("launch:")[1]
    assert "accelerate launch --num_processes 2 --use_deepspeed --deepspeed_config_file" in launch
    assert "recipes/pretrain_gpt.py model.preset=gpt-tiny" in launch
    assert f"train.micro_batch_size={ds['train_micro_batch_size_per_gpu']}" in launch
    assert f"train.grad_accum={ds['gradient_accumulation_steps']}" in launch
    assert "recommended:" in text and "configurations fit" in text


def test_nothing_fits_says_what_would_help(tmp_path, capsys):
    rc = planner.plan_main(["--model", "gpt-tiny", "--gpu-mem", "0.001GB", "--seq", "64",
                            "--out", str(tmp_path / "p.json")])
    assert rc == 1 and "nothing fits" in capsys.readouterr().out
    assert not (tmp_path / "p.json").exists()
