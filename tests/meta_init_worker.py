"""tests/test_meta_init.py's ranks: each run's model built as pretrain_gpt builds it (zerokit.backends.init_plan,
then the engine), its weights (and a 16-bit engine's fp32 masters) gathered whole on rank 0 and compared
with a one-process build; then the
recipe itself trains each run (the test compares those runs with one process).

    torchrun --nproc_per_node 2 tests/meta_init_worker.py OUT.json RUNS.json   (RUNS: name -> overrides)
"""
import importlib.util
import json
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from zerokit.backends import make_backend
from zerokit.backends.init_plan import plan
from zerokit.config import load_config
from zerokit.dist import exit_process, init_distributed, shutdown
from zerokit.models import build_causal_lm
from zerokit.recipe import setup_logging

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "pretrain_gpt.py"
VOCAB = 512


def build(cfg, init: str = "full", zero_init=None):
    m = cfg.model
    return build_causal_lm(m.preset, None, VOCAB, cfg.data.block_size, m.dropout, False, cfg.train.seed, None,
                           m.attn, m.sdpa_backend, None, None, init, zero_init)


def whole_weights(backend) -> dict[str, torch.Tensor]:
    """Every parameter gathered whole (every rank takes part): FSDP2's DTensors, ZeRO-3's partitions."""
    module = backend.module
    if backend.name == "deepspeed":
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            return {k: p.detach().clone() for k, p in module.named_parameters()}
    return {k: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for k, p in module.named_parameters()}


def fp32_masters(backend) -> dict[str, torch.Tensor]:
    """A 16-bit DeepSpeed engine's fp32 master of every parameter, whole (collective under ZeRO-3)."""
    from deepspeed.utils import safe_get_full_fp32_param
    return {k: safe_get_full_fp32_param(p).detach().clone() for k, p in backend.module.named_parameters()}


def compare(got: dict, want: dict) -> dict:
    return {"names_equal": sorted(got) == sorted(want),
            "max_abs_diff": max(((got[k].float() - want[k].float()).abs().max().item() for k in want), default=0.0),
            "all_equal": all(torch.equal(got[k], want[k]) for k in want)}


def held_fraction(model) -> float:
    """Parameter elements this rank holds right after the build, over the model's (ZeRO-3 partitions its
    ds_tensor; a meta parameter holds none)."""
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else 0 if p.is_meta else p.numel()
               for p in model.parameters())
    return held / total


def main() -> None:
    out, runs = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    setup_logging(0)
    info = init_distributed()
    spec = importlib.util.spec_from_file_location("recipe", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    result = {}
    try:
        for name, overrides in runs.items():
            cfg = load_config(RECIPE.parent / "configs" / "pretrain_gpt.yaml", overrides)
            init, zero_init = plan(cfg, info)
            model = build(cfg, init, zero_init)
            held = held_fraction(model)
            backend = make_backend(model, cfg.train, info, cfg.ds_config, cfg.fsdp, optim=cfg.optim)
            got = whole_weights(backend)
            masters = fp32_masters(backend) if backend.name == "deepspeed" and backend.precision != "fp32" else None
            if info.is_main:
                want = {k: p.detach() for k, p in build(cfg).named_parameters()}  # one process, fp32
                dtype = next(iter(got.values())).dtype  # a 16-bit engine's weights: the fp32 init rounded once
                result[name] = {"init": init, "held_at_build": held,
                                **compare(got, {k: v.to(dtype) for k, v in want.items()})}
                buffers = {k: b for k, b in build(cfg).named_buffers()}
                result[name]["buffers"] = compare(dict(backend.module.named_buffers()), buffers)
                result[name]["buffer_dtypes"] = sorted({str(b.dtype) for b in backend.module.buffers()})
                if masters is not None:
                    result[name]["masters"] = compare(masters, want)
            del backend, model
            recipe.main(cfg)  # the same run through the recipe: trains, checkpoints
    finally:
        shutdown()
    if info.is_main:
        out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
    exit_process(0)
