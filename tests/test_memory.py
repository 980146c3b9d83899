"""The estimator against measured peaks (allocator-level live-storage counting) and the ZeRO formulas."""
import json

import pytest
import torch
from transformers import GPT2LMHeadModel

from lab_fixtures import LLAMA_7B, one_thread, small_gpt2  # noqa: F401 (one_thread: autouse fixture)
from zerokit.errors import UsageError
from zerokit.lab.build import apply_grad_ckpt
from zerokit.lab.estimate import estimate, estimate_main
from zerokit.lab.flags import parse_bytes
from zerokit.lab.measure import LiveBytes, measure_step_peak, train_step
from zerokit.lab.zero_formula import STATE_ITEMS, model_states, model_stats, partition_overlap

# Small enough for a loaded 2-core box, big enough that activations, the loss and the
# model states all matter: ~0.5M params, 16 x params ~ 8 MB, activations 1-16 MB.
L, H, HEADS, V, S = 2, 128, 4, 1024, 128


def gpt2(attn="sdpa"):
    return small_gpt2(L, H, HEADS, S, V, attn=attn)


def measured(cfg, micro_batch, ckpt, peft):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).train()
    if peft == "lora":
        from zerokit.peft_setup import apply_peft
        model = apply_peft(model, "lora")
        apply_grad_ckpt(model.get_base_model(), ckpt)
    else:
        apply_grad_ckpt(model, ckpt)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, V, (micro_batch, S))
    return measure_step_peak(model, {"input_ids": ids, "labels": ids}, opt)


# 12 sweep points: stage 0, fp32, one process on CPU (what a plain PyTorch step does)
SWEEP = ([("sdpa", b, ckpt, "none") for b in (1, 4) for ckpt in ("none", "full", "selective")]
         + [("sdpa", b, ckpt, "lora") for b in (1, 4) for ckpt in ("none", "full")]
         + [("eager", 4, ckpt, "none") for ckpt in ("none", "full")])


@pytest.mark.parametrize("attn,micro_batch,ckpt,peft", SWEEP)
def test_estimate_matches_measured_step(attn, micro_batch, ckpt, peft):
    cfg = gpt2(attn)
    m = measured(cfg, micro_batch, ckpt, peft)
    e = estimate(cfg, micro_batch=micro_batch, seq=S, grad_ckpt=ckpt, precision="fp32", peft=peft, attn=attn,
                 device="cpu")
    # model states: exact (weights, fp32 AdamW m+v; grads of trainable params only)
    assert e.weights + e.optimizer_state == pytest.approx(m["params_bytes"] + m["optimizer_state_bytes"], rel=0.01)
    assert e.trainable_params * 4 == pytest.approx(m["grads_bytes"], rel=0.01)
    # the whole peak: the acceptance bar is 15%; we hold 5% (observed <= 2.2%), so a lost
    # term as small as the gradients built during backward (~9% here) fails the test
    assert e.total == pytest.approx(m["peak_bytes"], rel=0.05), (e.items(), m)


def test_per_block_bytes_match_saved_tensors_of_a_real_block():
    """Independent of the meta probe: what autograd saves in one real CPU block (storages deduplicated)."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    cfg = gpt2("eager")
    blk = GPT2Block(cfg, layer_idx=0).train()
    params = {p.untyped_storage()._cdata for p in blk.parameters()}
    seen, keep = {}, []

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in params:
            seen[st._cdata] = st.nbytes()
            keep.append(t)
        return t

    x = torch.randn(4, S, H, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        blk(x)
    e = estimate(cfg, micro_batch=4, seq=S, precision="fp32", attn="eager", device="cpu")
    # (a block's output is the next block's saved input, so per block the two sets are the same size)
    assert sum(e.per_layer.values()) == pytest.approx(sum(seen.values()), rel=0.01)


def test_gpu_model_keeps_masks_and_flash_drops_seq_squared():
    cfg = gpt2()
    cfg.n_positions = 2 * S

    def per_layer(attn, seq, device="cuda"):
        return estimate(cfg, micro_batch=2, seq=seq, precision="bf16", attn=attn, device=device).per_layer
    # CUDA dropout keeps a 1-byte mask where CPU keeps a noise tensor of the activation dtype
    assert sum(per_layer("eager", S).values()) < sum(per_layer("eager", S, "cpu").values())

    def attn_gap(seq):  # eager keeps B x heads x S x S probabilities; flash SDPA keeps O(S)
        return per_layer("eager", seq)["attn"] - per_layer("sdpa", seq)["attn"]
    assert attn_gap(2 * S) / attn_gap(S) == pytest.approx(4, rel=0.1)


def test_checkpointing_keeps_only_block_inputs():
    cfg = gpt2()
    e = estimate(cfg, micro_batch=4, seq=S, grad_ckpt="full", precision="bf16", device="cuda")
    assert sum(e.per_layer.values()) == 4 * S * H * 2  # one bf16 hidden state per block


def test_zero_model_state_formulas_7b():
    st = model_stats(LLAMA_7B)
    psi = st.params
    assert 6.7e9 < psi < 6.8e9

    def states(stage, offload="none", n=8):
        ms = model_states(st, world_size=n, stage=stage, offload=offload, precision="bf16", peft="none")
        return sum(ms[k] for k in STATE_ITEMS)
    assert states(0) == 16 * psi                                   # 2 + 2 + 12 bytes per param
    assert states(1) == pytest.approx(4 * psi + 12 * psi / 8)      # optimizer partitioned
    # + gradients: Ψ/N each, plus the whole gradient of each tensor that straddles a partition edge
    grads2 = model_states(st, world_size=8, stage=2, offload="none", precision="bf16", peft="none")["gradients"]
    busiest = max(partition_overlap(st.groups, 8, r) for r in range(8))
    assert grads2 == 2 * busiest and psi / 8 < busiest < 1.1 * psi / 8
    assert states(2) == pytest.approx(2 * psi + 12 * psi / 8 + grads2)
    assert states(3) == pytest.approx(16 * psi / 8, rel=0.001)     # + weights (small params stay whole)
    assert states(3, "all", n=1) < 1e8                             # everything on the CPU
    # what offload moves is on the host instead: device + host is the same model state
    for offload in ("optimizer", "params", "all"):
        ms = model_states(st, world_size=8, stage=3, offload=offload, precision="bf16", peft="none")
        assert sum(ms[k] + ms["host"][k] for k in STATE_ITEMS) >= states(3)


def test_lora_trains_only_adapters():
    st = model_stats(LLAMA_7B, "lora")
    ms = model_states(st, world_size=1, stage=0, offload="none", precision="bf16", peft="lora")
    assert st.trainable < 0.01 * st.params
    assert ms["optimizer_state"] == 8 * st.trainable and ms["gradients"] == 2 * st.trainable
    q = model_states(st, world_size=1, stage=0, offload="none", precision="bf16", peft="qlora")
    assert q["weights"] < 0.35 * ms["weights"]  # NF4 base


def test_live_bytes_counts_a_storage_once_until_freed():
    counter = LiveBytes()
    with counter:
        a = torch.ones(1000)
        v = a.view(10, 100)  # same storage
        assert counter.current == 4000
        del a, v
        assert counter.current == 0
    assert counter.peak == 4000


def test_usage_errors_name_the_fix():
    cfg = gpt2()
    with pytest.raises(UsageError, match="stage 1, 2 or 3"):
        estimate(cfg, stage=0, offload="optimizer", seq=S)
    with pytest.raises(UsageError, match="--stage 3"):
        estimate(cfg, stage=2, offload="params", seq=S)
    with pytest.raises(UsageError, match="lower --seq"):
        estimate(cfg, seq=4 * S)
    with pytest.raises(UsageError, match="choose one of"):
        estimate(cfg, seq=S, grad_ckpt="some")
    with pytest.raises(UsageError):
        parse_bytes("eighty")
    assert parse_bytes("80GB") == 80 * 2**30 and parse_bytes("1.5TB") == int(1.5 * 2**40)


def test_cli_json_and_table(capsys):
    assert estimate_main(["--model", "gpt-tiny", "--gpus", "2", "--stage", "2", "--micro-batch", "2",
                          "--seq", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    items = ("weights", "gradients", "optimizer_state", "master_weights", "activations", "logits_loss",
             "backward_temp", "zero_buffers", "overhead")
    assert out["total"] == sum(out[k] for k in items)
    assert out["inputs"]["world_size"] == 2 and out["host_per_node"] == 2 * out["host_per_rank"]
    assert estimate_main(["--model", "gpt-tiny", "--seq", "64", "--grad-ckpt", "full"]) == 0
    table = capsys.readouterr().out
    assert "activations" in table and "total" in table and "saved per block" in table


def test_measure_agrees_with_torch_memtracker():
    """Our live-storage counter against torch's own MemTracker on the same step."""
    import gc

    from torch.distributed._tools.mem_tracker import MemTracker

    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, V, (4, S))
    batch = {"input_ids": ids, "labels": ids}
    ours = measure_step_peak(model, batch, opt)["peak_bytes"]  # warms up, so optimizer state exists
    gc.collect()
    mt = MemTracker()
    mt.track_external(model, opt, ids)
    with mt:
        train_step(model, batch, opt)
    theirs = sum(v["Total"] for v in mt.get_tracker_snapshot("peak").values())
    assert ours == pytest.approx(theirs, rel=0.01)


@pytest.mark.slow  # ~60 s (a real DeepSpeed engine on a gloo rank); CI runs -m slow
def test_measure_through_a_real_deepspeed_engine_matches_the_plain_loop():
    """engine.backward / engine.step of a real DeepSpeed ZeRO-0 engine (one gloo rank, its own process):
    the step it measures holds what the same model's plain PyTorch step holds (ZeRO-0 fp32 = plain AdamW),
    and the optimizer state it finds behind the engine is Adam's 8 bytes per parameter."""
    import socket
    import sys

    from launch_util import REPO, run

    with socket.socket() as sock:  # a free port for the one-rank group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = run([sys.executable, str(REPO / "tests" / "lab_engine_worker.py")], timeout=300, RANK=0, LOCAL_RANK=0,
               WORLD_SIZE=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, PYTHONPATH=f"{REPO}:{REPO / 'tests'}")
    out = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT=")).split("=", 1)[1])
    plain, ds = out["plain"], out["deepspeed"]
    assert ds["global_steps"] == 2 and ds["params_changed"]  # warm-up + measured, through the engine
    n = ds["params"]
    assert ds["optimizer_state_bytes"] == pytest.approx(8 * n, rel=0.01)
    assert ds["grads_bytes"] == pytest.approx(4 * n, rel=0.01)
    assert ds["peak_bytes"] == pytest.approx(plain["peak_bytes"], rel=0.03), (ds, plain)
