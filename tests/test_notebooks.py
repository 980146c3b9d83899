"""Execute notebooks/ top to bottom (`pytest -m notebooks`), each within 5 minutes, and check what it
measured: every notebook leaves a SUMMARY dict, read back through one extra cell appended here."""
import json
import math
import re
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
LIMIT_S = 600  # per cell; each notebook takes minutes on a quiet 2-core machine, twice that when it is shared


def run_notebook(name: str, tmp_path, data_dir, monkeypatch) -> dict:
    nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{name} is committed with outputs"
    nb.cells.append(nbformat.v4.new_code_cell('print("SUMMARY=" + json.dumps(SUMMARY, default=float))'))
    monkeypatch.setenv("ZEROKIT_NB_OUT", str(tmp_path))  # the kernel inherits these: runs go to the test's folder
    monkeypatch.setenv("ZEROKIT_DATA", str(data_dir))
    client = NotebookClient(nb, timeout=LIMIT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(NB_DIR)}})  # cwd = notebooks/, as in Jupyter
    t0 = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - t0
    print(f"{name}: {elapsed:.0f} s")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    summary_line = [o.text for o in outputs if o.output_type == "stream" and o.text.startswith("SUMMARY=")]
    summary = json.loads(summary_line[-1].split("=", 1)[1])
    # each notebook ends with a plot and a table (the last cell before ours and the timing print)
    last = nb.cells[-3].outputs
    assert any("image/png" in o.get("data", {}) for o in last), f"{name}: the last cell shows no plot"
    assert any("text/html" in o.get("data", {}) for o in last if o.output_type == "execute_result"), \
        f"{name}: the last cell shows no table"
    assert elapsed <= LIMIT_S, f"{name} took {elapsed:.0f} s (> {LIMIT_S} s)"
    return summary


@pytest.mark.notebooks
def test_01_memory_anatomy(tmp_path, data_dir, monkeypatch):
    s = run_notebook("01_memory_anatomy", tmp_path, data_dir, monkeypatch)
    assert all(0.85 < r < 1.15 for r in s["cpu_estimate_over_measured"]), s  # estimate vs measured CPU step
    t = s["zero_total_gib"]
    assert t[0] > t[1] > t[2] > t[3] > 0, t  # each ZeRO stage shards more
    assert s["ckpt_saved_mib"] > 5, s


@pytest.mark.notebooks
def test_02_checkpointing_and_accumulation(tmp_path, data_dir, monkeypatch):
    s = run_notebook("02_checkpointing_and_accumulation", tmp_path, data_dir, monkeypatch)
    assert all(f < 0.8 * n for n, f in zip(s["peak_none"], s["peak_full"])), s  # checkpointing saves memory
    assert s["accum_max_rel_diff"] < 1e-4, s  # 1x8 == 2x4 == 4x2 up to float rounding
    assert 0.2 < s["ckpt_relative_speed"] < 1.5, s  # recompute costs; a shared box is noisy


@pytest.mark.notebooks
def test_03_mixed_precision_and_quantization(tmp_path, data_dir, monkeypatch):
    s = run_notebook("03_mixed_precision_and_quantization", tmp_path, data_dir, monkeypatch)
    # the notebook lets through only zerokit's refusal (UsageError) of a precision; on this CPU all three run
    # (fp16 with GradScaler through the plain backend), so a refusal here fails too
    assert s["precision_status"] == {"fp32": "ok", "bf16": "ok", "fp16": "ok"}, s
    assert 0.2 < s["adam8_state_ratio"] < 0.35, s  # 8-bit moments (+ fp32 for small tensors)
    assert s["adam8_update_cos"] > 0.95, s
    assert s["nf4_footprint_ratio"] < 0.7 and s["nf4_rel_err"] < 0.5, s


@pytest.mark.notebooks
def test_04_zero_and_offload(tmp_path, data_dir, monkeypatch):
    s = run_notebook("04_zero_and_offload", tmp_path, data_dir, monkeypatch)
    assert s["names"] == ["z0_off-none", "z1_off-none", "z2_off-none", "z2_off-optimizer", "z3_off-none",
                          "z3_off-all"], s
    assert all(t > 0 for t in s["tokens_per_s"]), s
    e = dict(zip(s["names"], s["est_states"]))
    # ZeRO-3 keeps the tensors under its persistence threshold ("auto": 10 x hidden) whole besides the partition
    assert e["z2_off-none"] < e["z1_off-none"] < e["z0_off-none"] and e["z3_off-none"] < e["z0_off-none"], e


@pytest.mark.notebooks
def test_05_lora_qlora(tmp_path, data_dir, monkeypatch):
    s = run_notebook("05_lora_qlora", tmp_path, data_dir, monkeypatch)
    tr = s["trainable"]
    assert tr["lora"] < 0.1 * tr["none"] and tr["qlora"] == tr["lora"], tr
    assert s["weights_mib"]["qlora"] < s["weights_mib"]["lora"], s
    assert all(0.5 <= a <= 1.0 for a in s["accuracy"].values()), s  # a measured accuracy, not a placeholder
    assert s["accuracy"]["lora"] > 0.6, s  # 40 LoRA steps learn something on SST-2


def check_report(folder: Path, tables: list[str]) -> None:
    """The report skeleton the notebook wrote: its sections, its tables, and the plots it shows exist."""
    text = (folder / "report.md").read_text()
    for heading in ("## Setup", "## Results", "## Observations", *[f"### {t}" for t in tables]):
        assert heading in text, heading
    plots = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert plots and all((folder / p).is_file() for p in plots), plots


@pytest.mark.notebooks
def test_06_attention_and_generation(tmp_path, data_dir, monkeypatch):
    s = run_notebook("06_attention_and_generation", tmp_path, data_dir, monkeypatch)
    check_report(tmp_path / "06_attention_and_generation", ["Summary", "Attention kernels", "MHA / GQA / MQA", "Generation"])
    peak, lengths = s["attn_peak_mib"], s["lengths"]
    growth = {impl: p[-1] / p[-2] for impl, p in peak.items()}  # the longest length over half of it
    assert lengths[-1] == 2 * lengths[-2], lengths
    # the score matrix takes over: ~x4 per doubling for eager and the math kernel, ~x2 for the fused kernel
    assert growth["eager"] > 3.3 and growth["sdpa-math"] > 3.3, growth
    assert 1.6 < growth["sdpa-flash"] < 2.3, growth
    assert peak["eager"][-1] > 4 * peak["sdpa-flash"][-1] > 0, peak
    assert peak["eager"][-1] > s["score_matrix_mib"][-1], s  # at least one whole score matrix is live at the peak
    # KV cache per token: 2 (K and V) x layers x kv_heads x head_dim x dtype bytes, measured and estimated
    formula = [2 * s["layers"] * kv * s["head_dim"] * s["dtype_bytes"] for kv in s["kv_heads"]]
    assert s["kv_heads"] == [4, 2, 1] and s["kv_bytes_measured"] == formula == s["kv_bytes_estimator"], s
    # the short training learned: losses finite and falling, validation better than a uniform guess
    for losses in s["kv_train_losses"]:
        assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 1.0, losses
    assert all(v < math.log(s["vocab"]) for v in s["kv_val_loss"]), s
    assert max(s["kv_val_bpb"]) < 1.15 * min(s["kv_val_bpb"]), s  # same budget: close quality at this size
    gen = s["generation"]
    assert {r["mode"] for r in gen} == {"dynamic", "static", "none", "paged"}, gen
    assert all(r["same_as_dynamic"] is True for r in gen), gen  # greedy: the cache changes cost, not tokens
    held = s["prompt_tokens"] + s["new_tokens"] - 1  # the last generated token is never fed back
    for r in gen:
        if r["mode"] == "dynamic":
            assert r["kv_cache_bytes"] == r["batch"] * held * formula[0], r
        if r["mode"] == "none":
            assert r["kv_cache_bytes"] == 0, r
    big = max(r["batch"] for r in gen)
    decode = {r["mode"]: r["decode_tok_s"] for r in gen if r["batch"] == big}
    assert decode["dynamic"] > 1.5 * decode["none"], decode  # without a cache each step re-runs the sequence (3-7x here)


@pytest.mark.notebooks
def test_07_mixture_of_experts(tmp_path, data_dir, monkeypatch):
    s = run_notebook("07_mixture_of_experts", tmp_path, data_dir, monkeypatch)
    check_report(tmp_path / "07_mixture_of_experts", ["Summary", "Parameters", "Training", "Load per expert"])
    dense, moe = "llama-tiny", s["moe"]
    assert s["presets"] == [dense, "moe-tiny", "qwen-moe-tiny"] and moe == s["presets"][1:], s
    # the estimator's total and active counts equal the model's and the count from the config
    assert s["est_params"] == s["params"] and s["est_active"] == s["active_by_hand"], s
    assert s["est_active"][dense] == s["params"][dense], s  # dense: every parameter is active
    for p in moe:
        assert s["est_active"][p] < s["params"][p], (p, s)
        assert s["flops_per_token"][p] < s["flops_per_token"][dense] * s["params"][p] / s["params"][dense], (p, s)
    # moe-tiny's top-2 of 4 experts of width 88 is the dense MLP's width 176: the same active parameters + the router
    router = 2 * 64 * 4  # layers x hidden x experts
    assert s["est_active"]["moe-tiny"] == s["params"][dense] + router, s
    # the router load in metrics.jsonl: every expert got tokens, each token counted once per chosen expert
    for p in moe:
        assert all(n > 0 for layer in s["expert_tokens"][p] for n in layer), (p, s["expert_tokens"][p])
        assert s["router_lines"][p] == s["steps"] // s["log_every"], s
        assert all(n == s["expected_per_line"][p] for line in s["assignments_per_line"][p] for n in line), p
    for p, losses in s["train_losses"].items():
        assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 1.0, (p, losses)
        assert s["val_loss"][p] < math.log(s["vocab"]), s  # better than a uniform guess
        assert s["step_ms"][p] > 0 and s["fwd_bwd_ms"][p] > 0, s
