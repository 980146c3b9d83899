"""zerokit plan: feasibility against the ZeRO formulas, the cost model, the DeepSpeed JSON and launch command."""
import json

import pytest
import torch
from transformers import LlamaConfig

from zerokit.lab import memory, planner
from zerokit.errors import UsageError

GiB = 2**30
# The 7B Llama shape of the issue; seq 1024 keeps the meta probes cheap (same code paths as 4096).
LLAMA_7B = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096)
SEQ = 1024
KW = dict(seq=SEQ, precision="bf16", ckpt_modes=("none", "full"), global_tokens=2**19)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def psi():
    return memory.model_stats(LLAMA_7B).params


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
    assert any(c.offload == "params" for c in fits)
    # offloaded master + Adam + fp32 grads are 16 bytes per param on the host (~100 GiB): 64 GB is too little
    none, misses = planner.plan(LLAMA_7B, gpus=1, gpu_mem=24 * GiB, host_mem=64 * GiB, **KW)
    assert not none
    assert all(c.est.host_per_node > 64 * GiB * planner.USABLE_FRACTION for c in misses if c.offload != "none")


def test_cost_model_matches_its_formulas():
    st = memory.model_stats(LLAMA_7B)
    hw = planner.HARDWARE["a100"]
    kw = dict(world_size=8, nodes=1, offload="none", micro_batch=1, grad_accum=1, seq=SEQ, precision="bf16",
              peft="none", hw=hw)
    t0 = planner.step_time(LLAMA_7B, st, stage=0, grad_ckpt="none", **kw)
    L, H = 32, 4096
    flops = 3 * (2 * st.matmul_params + 4 * L * H * SEQ) * SEQ  # forward + backward (2x)
    assert t0["compute"] == pytest.approx(flops / (hw.peak_flops * hw.mfu))
    assert t0["comm"] == pytest.approx(2 * 7 / 8 * 2 * st.params / hw.intra_bw)  # all-reduce of bf16 grads
    full = planner.step_time(LLAMA_7B, st, stage=0, grad_ckpt="full", **kw)
    assert full["compute"] == pytest.approx(t0["compute"] * 4 / 3)  # one more forward
    t3 = planner.step_time(LLAMA_7B, st, stage=3, grad_ckpt="none", **kw)
    assert t3["comm"] == pytest.approx(1.5 * t0["comm"])  # ZeRO paper: stage 3 moves 3 psi vs 2 psi
    total = t0["compute"] + t0["comm"] + planner.MICRO_STEP_LATENCY_S
    assert t0["total"] == pytest.approx(total)
    off = planner.step_time(LLAMA_7B, st, stage=3, grad_ckpt="none", **dict(kw, offload="params"))
    assert off["offload"] > 0 and off["total"] > t3["total"]


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
