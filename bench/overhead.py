"""Toolkit overhead: zerokit's training step vs a bare loop on the same engine, same run.

    torchrun --nproc_per_node 2 bench/overhead.py --engine deepspeed --ds-config ds_configs/zero2.json
    python bench/overhead.py --engine plain

Two copies of the same model train on the same batches, alternating blocks of steps: zerokit's
`train_step` (the loop's whole per-step path: window token count, lr, micro-batches, backend
step) against the ~15 lines a DeepSpeed (or plain PyTorch) user would write. Prints the median
step time of each after warm-up and their ratio (goal <= 1.03). Logging, eval and checkpoints
happen every N steps in the loop and are not part of the step. Both compute the same forward
(no KV cache, which HF builds by default when not told otherwise) and the same
cross-entropy, so the ratio is the loop's own cost.
"""
import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from zerokit.backends import make_backend
from zerokit.config import load_config
from zerokit.data.packed import BlockLoader
from zerokit.dist import init_distributed, shutdown
from zerokit.loop import train_step
from zerokit.models import build_causal_lm
from zerokit.pretraining import PretrainTask, prepare_data
from zerokit.optim import build_adamw

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bare_deepspeed(model, cfg, ds_config):
    import deepspeed
    from zerokit.backends.deepspeed import load_ds_json, resolve_ds_config
    info_world = int(os.environ.get("WORLD_SIZE", "1"))
    ds = resolve_ds_config(load_ds_json(ds_config), cfg.train, info_world, model.config.hidden_size, "fp32")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, foreach=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)

    def step(window):
        for micro in window:
            logits = engine(input_ids=micro["input_ids"], use_cache=False).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), micro["targets"].flatten())
            engine.backward(loss)
            engine.step()
    return step


def bare_plain(model, cfg, device):
    model.to(device)
    opt = build_adamw(model, cfg.train.lr, tuple(cfg.train.betas), cfg.train.eps, cfg.train.weight_decay)

    def step(window):
        for micro in window:
            logits = model(input_ids=micro["input_ids"].to(device), use_cache=False).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), micro["targets"].to(device).flatten()) / len(window)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=["deepspeed", "plain"], default="deepspeed")
    p.add_argument("--ds-config", default="ds_configs/zero2.json")
    p.add_argument("--rounds", type=int, default=8, help="alternating blocks per side")
    p.add_argument("--block", type=int, default=5, help="steps per block")
    p.add_argument("overrides", nargs="*", help="pretrain_gpt.yaml key=value settings (model, batch, ...)")
    args = p.parse_args()
    cfg = load_config(REPO / "recipes" / "configs" / "pretrain_gpt.yaml",
                      ["model.dropout=0.0", "train.micro_batch_size=8", "data.block_size=256", *args.overrides])
    info = init_distributed()
    tokenizer, data_dir = prepare_data(cfg.data, Path.home() / ".cache" / "zerokit")
    t = cfg.train
    loader = BlockLoader(data_dir, "train", cfg.data.block_size, t.micro_batch_size, t.grad_accum,
                         info.rank, info.world_size, t.seed)
    windows = [loader.next_window() for _ in range(4)]  # cycled: data loading is benchmarked elsewhere
    build = lambda: build_causal_lm(cfg.model.preset, None, len(tokenizer), cfg.data.block_size, 0.0, False, t.seed,
                                    tokenizer.eos_token_id)
    backend = make_backend(build(), t, info, args.ds_config if args.engine == "deepspeed" else None)
    bare = bare_deepspeed(build(), cfg, args.ds_config) if args.engine == "deepspeed" else bare_plain(build(), cfg, info.device)
    task = PretrainTask(data_dir, cfg.data.block_size, t.micro_batch_size)
    sync = torch.cuda.synchronize if info.device.type == "cuda" else (lambda: None)

    def timed(fn, i):
        sync()
        t0 = time.perf_counter()
        fn(windows[i % len(windows)])
        sync()
        return time.perf_counter() - t0

    zk_step = lambda w: train_step(backend, task, w, info, t.lr)
    for i in range(3):  # warm-up both
        timed(zk_step, i), timed(bare, i)
    zk, raw = [], []
    for r in range(args.rounds):
        zk += [timed(zk_step, r * args.block + i) for i in range(args.block)]
        raw += [timed(bare, r * args.block + i) for i in range(args.block)]
    if info.is_main:
        mz, mb = statistics.median(zk), statistics.median(raw)
        print(f"| engine | ranks | model | zerokit step (median of {len(zk)}) | bare step | ratio |")
        print("|---|---|---|---|---|---|")
        print(f"| {args.engine}{' ' + Path(args.ds_config).stem if args.engine == 'deepspeed' else ''} | {info.world_size} "
              f"| {cfg.model.preset} mb{t.micro_batch_size}x{cfg.data.block_size} | {mz * 1e3:.1f} ms | {mb * 1e3:.1f} ms | {mz / mb:.3f} |")
    shutdown()


if __name__ == "__main__":
    main()
