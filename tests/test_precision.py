"""Mixed precision made exact on every path (issue 14, part 1).

bf16 has an 8-bit significand: its unit roundoff is u = 2^-8 (round to nearest: |fl(x) - x| <= u/2 |x|);
fp32's is 2^-24. Under bf16 every engine here computes with 16-bit weights, so each micro-batch's
gradient is rounded to bf16 once; what an engine adds on top - accumulating micro-batches, reducing
across ranks, stepping the optimizer - must happen in fp32 on fp32 master weights. The tests check
that at the level of gradients and master weights, where the error of a 16-bit accumulation (O(u))
is ~10^4 times the fp32 bound, rather than through losses, which cannot tell the two apart.

This file doubles as the worker of the gradient-level test: `torchrun ... tests/test_precision.py SPEC OUT`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

U_BF16 = 2.0 ** -8
U_FP32 = 2.0 ** -24
VOCAB, SEQ, PER_RANK = 512, 32, 8  # 8 sequences per rank and step: 1x8 or 4 micro-batches of 2


# ---- the gradient-level worker (runs inside torchrun) ----------------------------------------
def _engine_grads(backend):
    """Full (unsharded) fp32 gradients before the step, as the engine holds them for its optimizer."""
    if backend.name == "deepspeed":
        from deepspeed.utils import safe_get_full_grad
        return {n: safe_get_full_grad(p).double() for n, p in backend.module.named_parameters()}
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).double()
            for n, p in backend.module.named_parameters()}


def _engine_masters(backend):
    """Full fp32 master weights (DeepSpeed's optimizer copies; FSDP's sharded parameters)."""
    if backend.name == "deepspeed":
        from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
        from deepspeed.utils import safe_get_full_fp32_param
        opt = backend.engine.optimizer
        if isinstance(opt, FP16_Optimizer):  # ZeRO-0: one flat fp32 copy per param group
            from torch._utils import _unflatten_dense_tensors
            full = {id(p): m for flat, group in zip(opt.fp32_groups_flat, opt.fp16_groups)
                    for p, m in zip(group, _unflatten_dense_tensors(flat, group))}
            return {n: full[id(p)].double() for n, p in backend.module.named_parameters()}
        return {n: safe_get_full_fp32_param(p).double() for n, p in backend.module.named_parameters()}
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().double()
            for n, p in backend.module.named_parameters()}


def _worker(spec_path: str, out_path: str) -> None:
    import copy

    import torch
    from zerokit.backends import make_backend
    from zerokit.config import load_config
    from zerokit.dist import all_reduce_sum, init_distributed, shutdown
    from zerokit.models import build_causal_lm
    from zerokit.optim import build_adamw, set_lr
    from zerokit.pretraining import causal_lm_loss_sum

    info = init_distributed()
    root = Path(__file__).resolve().parents[1]
    spec, results = json.loads(Path(spec_path).read_text()), {}
    g = torch.Generator().manual_seed(100 + info.rank)
    ids = torch.randint(0, VOCAB, (PER_RANK, SEQ + 1), generator=g)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}
    lr = 1e-3
    for case in spec:
        accum = case["accum"]
        cfg = load_config(root / "recipes" / "configs" / "pretrain_gpt.yaml",
                          ["train.precision=bf16", "train.grad_clip=0.0", f"train.lr={lr}",
                           f"train.micro_batch_size={PER_RANK // accum}", f"train.grad_accum={accum}"])
        ds_config = case.get("ds_config")
        if case.get("ds_extra"):  # a JSON with explicit settings (the bf16-accumulation control)
            ds = json.loads((root / ds_config).read_text()) | case["ds_extra"]
            ds_config = str(Path(out_path).parent / f"{case['name']}.json")
            if info.is_main:
                Path(ds_config).write_text(json.dumps(ds))
            torch.distributed.barrier()
        model = build_causal_lm("gpt-tiny", None, VOCAB, SEQ, dropout=0.0, seed=0)
        reference = copy.deepcopy(model)  # fp32: the masters' reference
        bf16_copy = copy.deepcopy(model).to(torch.bfloat16)  # what the engine computes each micro-batch with
        backend = make_backend(model, cfg.train, info, ds_config, case.get("fsdp", "none"))
        window = [{k: v[j * (PER_RANK // accum):(j + 1) * (PER_RANK // accum)] for k, v in batch.items()}
                  for j in range(accum)]
        scale = info.world_size / all_reduce_sum(torch.tensor(float(batch["targets"].numel())))

        backend.set_lr(lr)
        for k, micro in enumerate(window):  # the loop's train_step, stopped before the optimizer step
            with backend.micro_batch(k == accum - 1):
                loss_sum, _ = causal_lm_loss_sum(backend.model, micro)
                backend.backward(loss_sum * scale, k == accum - 1)
        grads = _engine_grads(backend)

        # Reference: the same bf16 micro-batch gradients, summed exactly (fp64) over micro-batches and ranks.
        exact = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in bf16_copy.named_parameters()}
        absum = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in bf16_copy.named_parameters()}
        for micro in window:
            bf16_copy.zero_grad(set_to_none=True)
            loss_sum, _ = causal_lm_loss_sum(bf16_copy, micro)
            (loss_sum * scale).backward()
            for n, p in bf16_copy.named_parameters():
                exact[n] += p.grad.double()
                absum[n] += p.grad.double().abs()
        for n in exact:
            exact[n], absum[n] = all_reduce_sum(exact[n]) / info.world_size, all_reduce_sum(absum[n]) / info.world_size

        backend.step()
        masters = _engine_masters(backend)
        # fp32 AdamW on the fp32 initial weights with the exact gradient (rounded once to fp32).
        opt = build_adamw(reference, lr, tuple(cfg.train.betas), cfg.train.eps, cfg.train.weight_decay)
        set_lr(opt, lr)
        for n, p in reference.named_parameters():
            p.grad = exact[n].float()
        opt.step()

        # Bounds (elementwise). Gradient: n = accum x ranks fp32 additions of bf16 terms, each adding at most
        # 2^-24 of the running |sum| <= sum|g_i|.  Master after one AdamW step w1 = w0(1 - lr wd) - lr g/(|g| + eps):
        # its sensitivity to g is lr eps/(|g| + eps)^2 (capped at 2 lr), plus a few fp32 roundings of w.
        n_terms = accum * info.world_size
        eps = cfg.train.eps
        worst_g = worst_w = 0.0
        for n, p in reference.named_parameters():
            tol_g = n_terms * U_FP32 * absum[n] + 1e-30
            worst_g = max(worst_g, ((grads[n] - exact[n]).abs() / tol_g).max().item())
            gd = exact[n].abs()
            sens = torch.clamp(lr * eps / (gd + eps) ** 2 * tol_g, max=2 * lr)
            tol_w = sens + 4 * U_FP32 * (p.detach().double().abs() + lr)
            worst_w = max(worst_w, ((masters[n] - p.detach().double()).abs() / tol_w).max().item())
        results[case["name"]] = {
            "grad_vs_bound": worst_g, "master_vs_bound": worst_w,
            "grad_rel_l2": (sum(((grads[n] - exact[n]) ** 2).sum() for n in exact) ** 0.5
                            / sum((exact[n] ** 2).sum() for n in exact) ** 0.5).item(),
            "data_types": [str(t) for t in backend.engine.get_data_types()] + [str(backend.engine.communication_data_type)]
            if backend.name == "deepspeed" else None,
        }
        if info.is_main:
            print(f"{case['name']}: {results[case['name']]}", flush=True)
        if case.get("keep_grads") and info.is_main:
            torch.save({"grads": grads, "absum": absum}, Path(out_path).parent / f"{case['name']}_grads.pt")
        del backend
    if info.is_main:
        Path(out_path).write_text(json.dumps(results, indent=1))
    shutdown()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
    raise SystemExit(0)
