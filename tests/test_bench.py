"""`zerokit bench` (E3): a real 4-point sweep on 2 CPU ranks -> results.csv, two PNGs, report.md (in one
shared launch; the per-point launch in the slow suite); and the pieces it relies on (sweep expansion,
engine read-back, resetting the peak RSS)."""
import csv
import json
import math
import resource
import subprocess
import sys
import time

import pytest

from launch_util import REPO, env
from zerokit.config import load_config
from zerokit.errors import UsageError
from zerokit.lab.bench import DEFAULTS, engine_of, expand, parse_sweep, point_overrides, reset_peak_rss
from zerokit.lab.bench_report import observations


def test_sweep_expansion_drops_impossible_points_and_names_why():
    points, dropped = expand(parse_sweep(["stage=0,2", "offload=none,optimizer", "micro_batch=1,4"]))
    assert len(points) == 6  # stage 0 with offload=optimizer is not a DeepSpeed configuration
    assert len(dropped) == 2 and all("offload=optimizer has no configuration to run" in d for d in dropped)
    # "cpu" (the former spelling) is what each engine's offload JSON holds: ZeRO-2 optimizer, ZeRO-3 all
    points, dropped = expand(parse_sweep(["stage=2,3", "offload=cpu"]))
    assert points == [{"stage": "2", "offload": "optimizer"}, {"stage": "3", "offload": "all"}] and not dropped
    assert expand(parse_sweep(["stage=3", "offload=optimizer"]))[0] == []
    # FSDP points have no ZeRO stage: stage values collapse into one point per fsdp value
    points, _ = expand(parse_sweep(["stage=0,3", "fsdp=none,full_shard"]))
    assert points == [{"stage": "0", "fsdp": "none"}, {"fsdp": "full_shard"}, {"stage": "3", "fsdp": "none"}]


@pytest.mark.parametrize("bad,match", [(["zero=1"], "unknown"), (["stage=4"], "not allowed"),
                                       (["micro_batch=0"], "positive"), (["stage"], "key=v1,v2")])
def test_bad_sweeps_are_usage_errors(bad, match):
    with pytest.raises(UsageError, match=match):
        parse_sweep(bad)


def test_point_overrides_select_the_ds_json_and_the_estimate_reads_it_back():
    cases = {("3", "all"): ("zero3", 3, "all"), ("2", "optimizer"): ("zero2", 2, "optimizer"),
             ("1", "none"): ("zero1", 1, "none")}
    for (stage, offload), (engine, st, off) in cases.items():
        over = point_overrides({"stage": stage, "offload": offload, "grad_ckpt": "full", "micro_batch": "4", "seq": "64"})
        cfg = load_config(DEFAULTS, over)
        assert (cfg.model.grad_ckpt, cfg.train.micro_batch_size, cfg.data.block_size) == (True, 4, 64)
        e = engine_of(cfg)
        assert (e["engine"], e["stage"], e["offload"]) == (engine, st, off)
    fs = engine_of(load_config(DEFAULTS, point_overrides({"fsdp": "full_shard", "offload": "all"})))
    assert (fs["engine"], fs["stage"], fs["offload"]) == ("fsdp:full_shard", 3, "all")
    assert engine_of(load_config(DEFAULTS, point_overrides({"stage": "none"})))["engine"] == "ddp"


def test_peak_rss_reset_makes_ru_maxrss_per_run():
    """The premise of measuring several runs in one process: after the reset, ru_maxrss (what the
    loop reports) forgets an earlier, larger peak."""
    big = bytearray(300 * 2**20)
    big[::4096] = b"\1" * len(big[::4096])  # touch every page
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del big
    assert reset_peak_rss(), "cannot write /proc/self/clear_refs: bench would fall back to one launch per point"
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert after < before - 200, (before, after)


def test_observations_name_the_stage_and_checkpointing_cost():
    def row(stage, ckpt, tok, rss, growth):
        return {"name": f"z{stage}_{ckpt}", "point": {"stage": stage, "grad_ckpt": ckpt}, "tokens_per_s": tok,
                "peak_mem_mb": rss, "run_growth_mb": growth, "params": 1_000_000, "est_total_mb": 10.0 - int(stage),
                "est_activations_mb": 4.0 if ckpt == "none" else 0.5, "est_logits_loss_mb": 1.0,
                "est_backward_temp_mb": 0.0 if ckpt == "none" else 1.5, "est_zero_buffers_mb": 0.0}
    rows = [row("0", "none", 1000, 500, 60), row("0", "full", 750, 480, 40),
            row("3", "none", 800, 450, 30), row("3", "full", 600, 440, 20)]
    text = "\n".join(observations(rows))
    assert "lowest: ZeRO-3; 45 MiB below ZeRO-0" in text
    assert "ZeRO-3 80%" in text  # (800 + 600) / (1000 + 750)
    assert "75% of the throughput" in text and "-25% cost" not in text and "+25% cost" in text
    assert "saves 2.0 MiB" in text  # (4 + 1 + 0) - (0.5 + 1 + 1.5)
    assert "Fastest point: z0_none" in text


@pytest.mark.slow  # ~60 s of real runs; the sweep's expansion, reading and report are unit-tested above
def test_bench_four_point_sweep_writes_csv_plots_and_report(tmp_path):
    """E3: 4 ZeRO stages of gpt-tiny on 2 CPU ranks, in <= 5 minutes: all points in one torchrun launch
    (--launch shared), a warm-up run per engine, the peak reset per run."""
    out = tmp_path / "bench"
    argv = ["bench", "--sweep", "stage=0,1,2,3", "--gpus", "2", "--model", "gpt-tiny", "--steps", "4",
            "--launch", "shared", "--out", str(out), "--set", "data.vocab_size=512", "data.block_size=32",
            "train.micro_batch_size=4", f"data.cache_dir={tmp_path / 'cache'}"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "zerokit.cli", *argv], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=600)
    elapsed = time.perf_counter() - t0
    print(f"zerokit bench, 4 points on 2 ranks: {elapsed:.0f} s")
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert elapsed <= 300, f"bench took {elapsed:.0f} s (> 5 min)"
    assert sorted(p.name for p in (out / "logs").glob("*.json")) == ["launch.json"]  # one launch
    spec = json.loads((out / "logs" / "launch.json").read_text())
    names = ["z0", "z1", "z2", "z3"]
    assert [r["name"] for r in spec["runs"]] == [f"warmup{i}" for i in range(4)] + names

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["stage"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["engine"] for r in rows] == ["zero0", "zero1", "zero2", "zero3"]
    for r in rows:
        f = {k: float(v) for k, v in r.items() if k.endswith(("_mb", "tokens_per_s", "_min", "_max", "loss"))
             or k.startswith(("peak_mem", "mem_start"))}
        assert r["backend"] == "deepspeed" and r["gpus"] == "2" and r["precision"] == "fp32"
        assert 0 < f["tokens_per_s_min"] <= f["tokens_per_s"] <= f["tokens_per_s_max"] < 1e7
        for k in (0, 1):  # CPU RSS of a torch+DeepSpeed process: hundreds of MiB, not KiB or tens of GiB
            assert 150 < f[f"mem_start_mb_rank{k}"] <= f[f"peak_mem_mb_rank{k}"] < 8000, r
            rank = json.loads((out / "runs" / r["name"] / f"bench_rank{k}.json").read_text())
            # the high-water mark was reset for this run: the loop's peak is this run's, above its start
            assert rank["peak_reset"] and rank["mem_start_mb"] <= rank["rss_hwm_mb"]
        assert f["peak_mem_mb"] == max(f["peak_mem_mb_rank0"], f["peak_mem_mb_rank1"])
        assert abs(f["final_loss"] - math.log(512)) < 1.0  # 4 steps from a random init: ~ln(vocab)
        # the estimate is for this point: fp32 weights of the model, Adam state sharded from stage 1
        full = int(r["params"]) * 4 / 2**20
        if r["stage"] == "3":  # a half each, plus the small params every rank also keeps whole
            assert full / 2 < f["est_weights_mb"] <= 1.5 * full + 0.01
        else:
            assert f["est_weights_mb"] == pytest.approx(full, rel=0.01)
        assert f["est_total_mb"] > f["est_weights_mb"] + f["est_activations_mb"]
        # the run really used that DeepSpeed JSON on 2 ranks
        run_dir = out / "runs" / r["name"]
        assert f"ds_configs/zero{r['stage']}.json" in (run_dir / "config.yaml").read_text()
        assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2
    opt = [float(r["est_optimizer_state_mb"]) for r in rows]
    assert opt[1] == pytest.approx(opt[0] / 2, rel=0.01) and opt[3] == pytest.approx(opt[0] / 2, rel=0.01)

    import matplotlib.image as mpimg
    for png in ("memory.png", "throughput_vs_memory.png"):
        path = out / png
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
        img = mpimg.imread(path)
        assert img.shape[0] >= 300 and img.shape[1] >= 400 and img.std() > 0.01  # a real image, not blank

    report = (out / "report.md").read_text()
    for ref in ("](results.csv)", "](memory.png)", "](throughput_vs_memory.png)", "## Observations",
                "ru_maxrss", "torch 2.", "DeepSpeed 0.", "zerokit bench --sweep stage=0,1,2,3",
                "compare growth, not absolute peaks"):
        assert ref in report, ref
    table = [ln for ln in report.splitlines() if ln.startswith("| z")]
    assert [ln.split("|")[1].strip() for ln in table] == names
    obs = report.split("## Observations", 1)[1]
    assert "Measured peak memory per rank, mean by stage: ZeRO-0" in obs and "Fastest point" in obs
    assert "Caveat" not in obs  # the estimate models the reduce bucket the JSON's "auto" resolves to


@pytest.mark.slow
def test_bench_per_point_launch_runs_each_point_in_fresh_processes(tmp_path):
    """--launch per-point (the default): one torchrun per point, so each run's peak is its own."""
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "zerokit.cli", "bench", "--sweep", "stage=0,3", "grad_ckpt=none,full",
                           "--steps", "3", "--out", str(out), "--set", "data.vocab_size=512",
                           "data.block_size=32", f"data.cache_dir={tmp_path / 'cache'}"],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    names = ["z0_ckpt-none", "z0_ckpt-full", "z3_ckpt-none", "z3_ckpt-full"]
    assert sorted(p.stem for p in (out / "logs").glob("*.json")) == sorted(names)  # one launch each
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["name"] for r in rows] == names
    for r in rows:
        assert "warmup" not in r["name"] and 150 < float(r["mem_start_mb_rank0"]) <= float(r["peak_mem_mb_rank0"])
    assert "compare growth, not absolute peaks" not in (out / "report.md").read_text()
