"""O1: the optimizers behind optim.name (zerokit/optim.py). Each update against an independent reference
(a hand-written rule, another library's kernel), the estimator's state bytes against a measured step,
the engine combinations that are refused (exit 2, one line), and on 2 CPU ranks: losses equal to one
process running the same optimizer, and a resume that reproduces the uninterrupted run bit for bit."""
import json
import math
import re
from pathlib import Path

import pytest
import torch

from launch_util import REPO, losses, metrics, pretrain, pretrain_many
from zerokit.lab.measure import optimizer_tensors, storage_bytes
from zerokit.lab.zero_formula import model_stats, optimizer_state_bytes
from zerokit.models import build_causal_lm, model_config
from zerokit.optim import OPTIMIZERS, Lion, MuonAdamW, build_optimizer, hidden_matrices, set_lrs

LR, BETAS, WD = 1e-3, (0.9, 0.99), 0.1
# Constant lr after warm-up (min_lr = lr): a run to step 3 and one to step 6 share their first steps.
COMMON = ["train.min_lr=1e-3", "train.max_steps=6"]
RESUME = ["train.max_steps=3", "train.checkpoint_every=3"], ["train.checkpoint_every=3", "resume=auto"]
# bitsandbytes quantises each tensor in 256-element blocks but keeps tensors under 4096 elements in fp32;
# ZeRO hands it one flat partition per group and rank instead, so the blocks (and which elements stay
# fp32) differ from one process's, and so do the quantisation errors of the moments (each within 2.9 %
# of its block's absmax: test_8bit_first_step...). The relative loss difference this left after 6 steps
# was 7.5e-7 (adamw8bit) and 1.1e-5 (lion8bit, whose sign update flips where a requantised moment
# changes sign); 1e-4 is ten times the larger, and far under what a wrong lr or a skipped rank gives.
TOL_8BIT_ZERO = 1e-4


class Train(dict):
    __getattr__ = dict.__getitem__


TRAIN = Train(lr=LR, betas=list(BETAS), eps=1e-8, weight_decay=WD)


def steps(opt_of, p0: torch.Tensor, grads) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    p = torch.nn.Parameter(p0.clone())
    opt = opt_of([p])
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    p0 = torch.randn(64, 96)  # 6144 elements: over bitsandbytes' 4096 minimum, so its states are 8-bit
    return p0, [torch.randn_like(p0) * 0.01 for _ in range(5)]


def test_lion_is_the_sign_rule_and_matches_bitsandbytes(problem):
    import bitsandbytes as bnb
    p0, grads = problem
    p, m = p0.clone(), torch.zeros_like(p0)
    for g in grads:  # Chen et al. 2023, Algorithm 2 (decoupled weight decay)
        p = p * (1 - LR * WD) - LR * torch.sign(BETAS[0] * m + (1 - BETAS[0]) * g)
        m = BETAS[1] * m + (1 - BETAS[1]) * g
    ours, _ = steps(lambda ps: Lion(ps, lr=LR, betas=BETAS, weight_decay=WD), p0, grads)
    theirs, _ = steps(lambda ps: bnb.optim.Lion(ps, lr=LR, betas=BETAS, weight_decay=WD, optim_bits=32), p0, grads)
    assert torch.allclose(ours, p, atol=1e-6, rtol=0)
    assert torch.allclose(theirs, p, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["adamw8bit", "lion8bit"])
def test_8bit_first_step_is_exact_and_moments_stay_within_a_quantisation_step(problem, name):
    """Step 1 starts from quantised zeros (exact), so it equals the fp32 optimizer. After that each step
    re-quantises the first moment with an error of at most half the dynamic map's widest code step
    (0.7 % of the 256-block's absmax), and the moment carries the older errors on, decayed by beta1:
    after 5 steps it is within 0.7 % x (1 + 0.9 + ... + 0.9^4) = 2.9 % of the fp32 moment."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    p0, grads = problem
    eight = {"adamw8bit": lambda ps: bnb.optim.AdamW8bit(ps, lr=LR, betas=BETAS, eps=1e-8, weight_decay=WD),
             "lion8bit": lambda ps: bnb.optim.Lion8bit(ps, lr=LR, betas=BETAS, weight_decay=WD)}[name]
    fp32 = {"adamw8bit": lambda ps: torch.optim.AdamW(ps, lr=LR, betas=BETAS, eps=1e-8, weight_decay=WD),
            "lion8bit": lambda ps: Lion(ps, lr=LR, betas=BETAS, weight_decay=WD)}[name]
    assert torch.allclose(steps(eight, p0, grads[:1])[0], steps(fp32, p0, grads[:1])[0], atol=1e-6, rtol=0)
    _, q = steps(eight, p0, grads)
    _, ref = steps(fp32, p0, grads)
    (qs,), (rs,) = q.state.values(), ref.state.values()
    assert qs["state1"].dtype == torch.uint8
    m = F.dequantize_blockwise(qs["state1"], absmax=qs["absmax1"], code=qs["qmap1"], blocksize=256)
    block_max = rs["exp_avg"].reshape(-1, 256).abs().amax(1, keepdim=True)
    err = ((m - rs["exp_avg"]).reshape(-1, 256).abs() / block_max).max().item()
    code = qs["qmap1"].sort().values
    bound = 0.5 * (code[1:] - code[:-1]).max().item() * sum(BETAS[0] ** k for k in range(len(grads)))
    assert 0 < err <= bound, (err, bound)


def newton_schulz_fp64(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Keller Jordan's quintic Newton-Schulz iteration (https://kellerjordan.github.io/posts/muon/), in fp64."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double().T if g.size(0) > g.size(1) else g.double()
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if g.size(0) > g.size(1) else x


def test_muon_is_muon_on_the_block_matrices_and_adamw_on_the_rest():
    """The split: Muon on exactly the 2-D weights inside transformer blocks, torch AdamW (bit-exact) on the
    rest. Two Muon steps against the rule written out in fp64 (momentum 0.95, Nesterov, lr x sqrt(max(1,
    rows/cols)), decoupled weight decay), and DeepSpeed's own muon_update (ZeRO's Muon) against the same.
    On the CPU zerokit's Muon iterates in fp32 (Fp32Muon): within 1e-5 of fp64. DeepSpeed's iterates in bf16
    (8 significant bits) through 5 steps whose polynomial has slope 3.4 near zero: measured 3.5 % from fp64
    (it rounds A@A and B@X apart); a wrong lr scale, a missing orthogonalisation or plain momentum for
    Nesterov are all > 10 %."""
    from deepspeed.runtime.zero.muon.original_muon import muon_update
    model = build_causal_lm("gpt-tiny", None, 512, 32, 0.0, False, 0, 0)
    opt = build_optimizer(model, TRAIN, {"name": "muon", "muon_lr": 0.02})
    assert isinstance(opt, MuonAdamW)
    matrices = {id(p) for b in model.transformer.h for p in b.parameters() if p.ndim == 2}
    assert {id(p) for p in hidden_matrices(model)} == matrices
    assert {id(p) for p in opt.muon.param_groups[0]["params"]} == matrices
    set_lrs(opt, LR)
    assert opt.param_groups[0]["lr"] == LR and opt.muon.param_groups[0]["lr"] == pytest.approx(0.02)

    named = dict(model.named_parameters())
    rest = [n for n, p in named.items() if id(p) not in matrices]
    adamw = torch.optim.AdamW([{"params": [named[n].detach().clone().requires_grad_() for n in rest if named[n].ndim == 2],
                                "weight_decay": WD},
                               {"params": [named[n].detach().clone().requires_grad_() for n in rest if named[n].ndim < 2],
                                "weight_decay": 0.0}], lr=LR, betas=BETAS, eps=1e-8)
    copies = dict(zip([n for n in rest if named[n].ndim == 2] + [n for n in rest if named[n].ndim < 2],
                      adamw.param_groups[0]["params"] + adamw.param_groups[1]["params"]))
    before = {n: p.detach().clone() for n, p in named.items()}
    torch.manual_seed(1)
    grads = [{n: torch.randn_like(p) * 0.01 for n, p in named.items()} for _ in range(2)]
    for g in grads:
        for n, p in named.items():
            p.grad = g[n].clone()
        for n, q in copies.items():
            q.grad = g[n].clone()
        opt.step()
        adamw.step()
    for n, q in copies.items():
        assert torch.equal(q, named[n].detach()), n
    with torch.no_grad(), torch._dynamo.config.patch(disable=True):  # DeepSpeed's kernels, eagerly
        for n, p in named.items():
            if id(p) not in matrices:
                continue
            lr, scale = 0.02, math.sqrt(max(1, p.size(0) / p.size(1)))
            ref, ours = before[n].double(), before[n].clone()
            buf, ds_buf = torch.zeros_like(ref), torch.zeros_like(p)
            for g in grads:
                buf = buf.lerp(g[n].double(), 0.05)
                ref = ref * (1 - lr * WD) - lr * scale * newton_schulz_fp64(g[n].double().lerp(buf, 0.95))
                ours = ours * (1 - lr * WD) - lr * muon_update(g[n].clone(), ds_buf, beta=0.95, ns_method="standard")
            step = ref - before[n]
            assert ((p - before[n] - step).norm() / step.norm()).item() < 1e-5, n
            assert ((ours - before[n] - step).norm() / step.norm()).item() < 0.05, n


@pytest.mark.parametrize("shape", [(64, 64), (176, 64), (64, 176)])
def test_cpu_muon_iterates_in_fp32_the_rule_torch_iterates_in_bf16(shape):
    """Fp32Muon (the CPU's Muon: torch's bf16 Newton-Schulz is ~19x slower on this CPU than fp32) against
    the rule in fp64 (tight: it differs only by fp32 rounding) and against torch.optim.Muon (loose: bf16)."""
    from zerokit.optim import Fp32Muon
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.1
    grads = [torch.randn(shape) * 0.01 for _ in range(3)]
    ours, theirs = w.clone().requires_grad_(), w.clone().requires_grad_()
    kw = dict(lr=0.02, weight_decay=WD, momentum=0.95)
    opts = [Fp32Muon([ours], **kw), torch.optim.Muon([theirs], **kw)]
    ref, buf = w.double(), torch.zeros(shape, dtype=torch.float64)
    scale = math.sqrt(max(1, shape[0] / shape[1]))
    for g in grads:
        ours.grad, theirs.grad = g.clone(), g.clone()
        for opt in opts:
            opt.step()
        buf = buf.lerp(g.double(), 0.05)
        ref = ref * (1 - 0.02 * WD) - 0.02 * scale * newton_schulz_fp64(g.double().lerp(buf, 0.95))
    step = ref - w.double()
    assert ((ours.detach().double() - w.double() - step).norm() / step.norm()).item() < 1e-5
    assert ((theirs.detach().double() - w.double() - step).norm() / step.norm()).item() < 0.03

OPT_OF = {"adamw": lambda ps: torch.optim.AdamW(ps, lr=LR), "lion": lambda ps: Lion(ps, lr=LR)}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_estimated_state_bytes_match_a_measured_step(name, capsys):
    """`optimizer_state_bytes` (the estimator's count) against the optimizer's tensors after one real step.
    What it leaves out, and the tolerance: per-tensor `step` scalars (torch AdamW: 4 bytes per tensor)
    and bitsandbytes' two 256-entry quantisation maps (2 KiB, shared by every tensor)."""
    config = model_config("gpt-tiny", 512, 32)
    model = build_causal_lm("gpt-tiny", None, 512, 32, 0.0, False, 0, 0)
    opt = build_optimizer(model, TRAIN, {"name": name, "muon_lr": 0.02})
    model(input_ids=torch.randint(0, 512, (2, 32)), labels=torch.randint(0, 512, (2, 32))).loss.backward()
    opt.step()
    measured = storage_bytes(optimizer_tensors(opt))
    estimated = optimizer_state_bytes(model_stats(config), name)
    params = sum(p.numel() for p in model.parameters())
    tensors = len(list(model.parameters()))
    slack = 4 * tensors + (2 * 256 * 4 if "8bit" in name else 0)
    with capsys.disabled():
        print(f"\n{name}: measured {measured / params:.3f} B/param, estimated {estimated / params:.3f} B/param "
              f"({params} params)")
    assert estimated <= measured <= estimated + slack, (measured, estimated)


def test_estimate_cli_counts_the_chosen_optimizer(capsys):
    from zerokit.lab.estimate import estimate_main
    states = {}
    for name in ("adamw", "lion8bit"):
        assert estimate_main(["--model", "gpt2", "--gpus", "8", "--stage", "2", "--optim", name, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        states[name] = out["optimizer_state"]
        assert out["inputs"]["optim"] == name
    stats = model_stats(model_config("gpt2"))
    assert states == {n: int(round(optimizer_state_bytes(stats, n, 8))) for n in states}
    assert 1.01 < states["lion8bit"] / (stats.trainable / 8) < 1.02  # 1 + 4/256 bytes per parameter


@pytest.mark.slow
def test_zero2_state_bytes_per_rank_match_the_estimate(capsys):
    """Under ZeRO-2 the optimizer state lives on each rank's flat partition of every param group: measured
    on 2 ranks of a real engine (tests/optim_state_worker.py) against `optimizer_state_bytes(shards=2)`.
    Tolerance: ZeRO pads each group to a multiple of 2 x ranks elements (< 4 elements of state per group
    and rank), 4 bytes per `step` tensor (torch AdamW, one per flat partition), bitsandbytes' 2 KiB maps."""
    from launch_util import launcher, run
    r = run([*launcher(2), str(REPO / "tests" / "optim_state_worker.py"), "ds_configs/zero2.json"], timeout=600)
    ranks = [json.loads(found) for found in re.findall(r"RESULT\d=(\{[^}]*\})", r.stdout)]  # lines may interleave
    assert len(ranks) == 2
    stats = model_stats(model_config("gpt-tiny", 512, 32))
    for name in OPTIMIZERS:
        estimated = optimizer_state_bytes(stats, name, shards=2)
        groups = len(stats.muon_groups if name == "muon" else stats.groups)
        slack = groups * (4 * 8 + 4) + (2 * 256 * 4 if "8bit" in name else 0)
        with capsys.disabled():
            print(f"\nZeRO-2, 2 ranks, {name}: measured {[b / (stats.trainable / 2) for b in (ranks[0][name], ranks[1][name])]} "
                  f"B/param of the rank's share, estimated {estimated / (stats.trainable / 2):.3f}")
        for got in (ranks[0][name], ranks[1][name]):
            assert abs(got - estimated) <= slack, (name, got, estimated)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory, data_dir):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("engine, optim, fix", [  # ~12 s each: two in the default suite, one per check site
    (["fsdp=full_shard"], "adamw8bit", "ds_config=zero2"),
    pytest.param(["ds_config=ds_configs/zero2_offload.json"], "lion", "optim.name=adamw", marks=pytest.mark.slow),
    pytest.param(["ds_config=ds_configs/zero3.json"], "muon", "\"reduce_scatter\": false", marks=pytest.mark.slow),
    (["ds_config={json_optimizer}"], "lion", "delete the JSON's \"optimizer\" block"),
])
def test_unsupported_combinations_exit_2_one_line(tmp_path, shared_cache, engine, optim, fix):
    json_optimizer = tmp_path / "zero2_adam.json"
    json_optimizer.write_text('{"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {}}}')
    engine = [e.format(json_optimizer=json_optimizer) for e in engine]
    r = pretrain(tmp_path / "run", *engine, f"optim.name={optim}", "train.max_steps=1", kind="python",
                 cache=shared_cache, check=False, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"optim.name={optim}" in lines[0] and fix in lines[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr


# ---- 2 ranks against one process, and exact resumes ------------------------------------------------------
# name -> (2-rank runs, their 1-process reference run): ZeRO-2 for every optimizer, DDP where ZeRO's
# flat partitions change the arithmetic (8-bit blocks; DeepSpeed's Muon), FSDP2 for Lion, ZeRO-3 once per
# kind of optimizer state (Lion's torch tensors, bitsandbytes', DeepSpeed's Muon with reduce_scatter off).
PAIRS = {
    "adamw": [("zero2", "plain")],
    "lion": [("zero2", "plain"), ("zero3", "plain"), ("fsdp", "plain")],
    "adamw8bit": [("ddp", "plain"), ("zero2", "plain"), ("zero3", "plain")],
    "lion8bit": [("ddp", "plain"), ("zero2", "plain")],
    "muon": [("ddp", "plain"), ("zero2", "zero2"), ("zero3_no_rs", "zero2")],
}
ENGINES = {"plain": [], "ddp": [], "zero2": ["ds_config=ds_configs/zero2.json"], "zero3": ["ds_config=ds_configs/zero3.json"],
           "fsdp": ["fsdp=full_shard"], "zero3_no_rs": ["ds_config={root}/zero3_no_reduce_scatter.json"]}


def run_lists(root: Path, nproc: int, selected: dict) -> list[list[str]]:
    """Per (optimizer, engine): the uninterrupted run; on 2 ranks also the same stopped at step 3 and
    resumed (DDP is the plain backend on more ranks: one process adds no code path to resume)."""
    mb = f"train.micro_batch_size={8 // nproc}"  # global batch 8 either way
    runs = []
    for name, engines in selected.items():
        for engine in sorted({pair[nproc == 1] for pair in engines}):
            base = [*COMMON, mb, f"optim.name={name}", *(e.format(root=root) for e in ENGINES[engine])]
            tag = f"{name}_{engine}_{nproc}"
            runs.append([*base, f"run_dir={root / tag}"])
            if nproc == 2:
                runs += [[*base, *extra, f"run_dir={root / (tag + '_resumed')}"] for extra in RESUME]
    return runs


def launch(tmp_path_factory, cache: Path, selected: dict) -> Path:
    root = tmp_path_factory.mktemp("optimizers")
    zero3 = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    zero3["zero_optimization"]["reduce_scatter"] = False  # DeepSpeed's ZeRO-3 takes Muon only so
    (root / "zero3_no_reduce_scatter.json").write_text(json.dumps(zero3))
    for nproc in (1, 2):
        pretrain_many(run_lists(root, nproc, selected), nproc=nproc, cache=cache, workdir=root)
    return root


def check_pairs(root: Path, name: str, pairs) -> list[str]:
    rows = []
    for two, one in pairs:
        got, ref = losses(root / f"{name}_{two}_2"), losses(root / f"{name}_{one}_1")
        assert got.keys() == ref.keys() == set(range(1, 7))
        worst = max(abs(got[s] - ref[s]) / ref[s] for s in got)
        tol = TOL_8BIT_ZERO if "8bit" in name and two.startswith("zero") else 1e-5
        rows.append(f"| {name} | {two} x2 vs {one} x1 | {worst:.1e} | {tol:.0e} |")
        assert worst <= tol, rows[-1]
    return rows


def check_resumes(root: Path, name: str, pairs) -> None:
    for engine in {two for two, _ in pairs}:
        tag = f"{name}_{engine}_2"
        whole, resumed = losses(root / tag), losses(root / f"{tag}_resumed")
        assert resumed == whole, f"{tag}: resumed {resumed} vs uninterrupted {whole}"
        # the first part's final evaluation (at step 3) is still in the history: the second part resumed
        assert any(m["step"] == 3 and "val_loss" in m for m in metrics(root / f"{tag}_resumed")), tag


@pytest.fixture(scope="module")
def lion_runs(tmp_path_factory, shared_cache):
    return launch(tmp_path_factory, shared_cache, {"lion": [("zero2", "plain")]})


def test_lion_zero2_matches_one_process_and_resumes_exactly(lion_runs, capsys):
    rows = check_pairs(lion_runs, "lion", [("zero2", "plain")])
    check_resumes(lion_runs, "lion", [("zero2", "plain")])
    with capsys.disabled():
        print("\n" + "\n".join(rows))


@pytest.fixture(scope="module")
def all_runs(tmp_path_factory, shared_cache):
    return launch(tmp_path_factory, shared_cache, PAIRS)


@pytest.mark.slow
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_two_ranks_match_one_process_and_resume_exactly(all_runs, name, capsys):
    rows = check_pairs(all_runs, name, PAIRS[name])
    check_resumes(all_runs, name, PAIRS[name])
    with capsys.disabled():
        print("\n" + "\n".join(rows))
