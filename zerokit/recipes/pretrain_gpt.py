"""Pre-train a GPT from scratch: tokenizer -> packed shards -> model -> the loop.

    python recipes/pretrain_gpt.py                                   # the CPU demo
    accelerate launch --num_processes 2 --use_deepspeed \\
        --deepspeed_config_file ds_configs/zero2.json recipes/pretrain_gpt.py train.max_steps=200
    torchrun --nproc_per_node 8 recipes/pretrain_gpt.py model.preset=gpt2-124m data.corpus=/data/owt ...

Every setting is in configs/pretrain_gpt.yaml.
"""
import logging
from pathlib import Path

from zerokit.backends import make_backend
from zerokit.backends.init_plan import plan as init_plan
from zerokit.config import save_config
from zerokit.data.packed import BlockLoader
from zerokit.dist import init_distributed
from zerokit.errors import UsageError
from zerokit.loop import train
from zerokit.models import build_causal_lm
from zerokit.pretraining import PretrainTask, prepare_data, sample_text
from zerokit.recipe import run_recipe

log = logging.getLogger("zerokit")


def main(cfg):
    if cfg.train.max_steps == 0 and not cfg.train.max_minutes:  # fine-tuning's max_steps=0 is a baseline evaluation; here nothing
        raise UsageError("train.max_steps=0 with train.max_minutes=0 trains nothing; set train.max_steps=N or a "
                         "time budget train.max_minutes=M")
    info = init_distributed(cfg.train.dist_timeout_s, cfg.train.cpu_threads, cfg.parallel.tensor, cfg.parallel.pipeline)
    run_dir = Path(cfg.run_dir)
    cache = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else Path.home() / ".cache" / "zerokit"

    # Data: every rank; the first tokenizes and packs under a file lock, the others then hit the cache.
    tokenizer, data_dir = prepare_data(cfg.data, cache)

    t = cfg.train
    init, zero_init = init_plan(cfg, info)  # ZeRO-3 / FSDP2: no rank builds the whole model
    model = build_causal_lm(cfg.model.preset, cfg.model.name_or_path, len(tokenizer), cfg.data.block_size,
                            cfg.model.dropout, cfg.model.grad_ckpt, t.seed, tokenizer.eos_token_id,
                            cfg.model.attn, cfg.model.sdpa_backend, cfg.model.kv_heads,
                            cfg.model.router_aux_loss_coef, init, zero_init)
    backend = make_backend(model, t, info, cfg.ds_config, cfg.fsdp, cfg.fsdp_offload, optim=cfg.optim,
                           megatron_sp=cfg.parallel.megatron_sp, pipeline_schedule=cfg.parallel.pipeline_schedule)
    loader = BlockLoader(data_dir, "train", cfg.data.block_size, t.micro_batch_size, t.grad_accum,
                         info.dp_rank, info.dp_size, t.seed)
    task = PretrainTask(data_dir, cfg.data.block_size, t.micro_batch_size, cfg.data.eval_batches)

    def write_extras(ckpt: Path) -> None:  # what `zerokit export` needs besides the weights
        save_config(cfg, ckpt / "config.yaml")
        backend.module.config.save_pretrained(ckpt / "model")
        tokenizer.save_pretrained(ckpt / "model")

    summary = train(cfg, backend=backend, task=task, loader=loader, info=info, seq_len=cfg.data.block_size,
                    write_extras=write_extras)
    if summary.get("preempted") or summary.get("nothing_to_do"):  # the loop said why; nothing to sample
        return backend
    s = cfg.sample
    text = sample_text(backend.module, tokenizer, s.prompt, s.max_new_tokens, s.temperature, s.top_k,
                       info.world_size) if s.max_new_tokens else None  # 0: no sample
    if info.is_main:
        if text is not None:
            (run_dir / "sample.txt").write_text(text)
        print(f"\nval_loss {summary['val_loss']:.4f}  val_bpb {summary['val_bpb']:.4f}  "
              f"{summary['tokens_per_s']:,.0f} tokens/s  {summary['train_seconds']:.0f} s\n"
              + (f"--- sample ---\n{text}\n" if text is not None else ""))
    return backend  # for callers that run the recipe in-process (tests, notebooks)


if __name__ == "__main__":
    raise SystemExit(run_recipe(main, Path(__file__).parent / "configs" / "pretrain_gpt.yaml", __doc__.split("\n")[0]))
