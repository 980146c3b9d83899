"""Baseline for bench/gpu_suite.sh: the Hugging Face Trainer on the same model shape, data,
batch and DeepSpeed JSON as a zerokit run; writes summary.json in the same format."""
import argparse
import json
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from zerokit.config import load_config
from zerokit.data.packed import BlockLoader
from zerokit.metrics import model_flops_per_token, peak_flops
from zerokit.models import build_causal_lm
from zerokit.pretraining import prepare_data

REPO = Path(__file__).resolve().parents[1]


class Windows(torch.utils.data.Dataset):
    """The packed training windows, as a map-style dataset for the Trainer."""

    def __init__(self, loader: BlockLoader, n: int):
        self.batches = [loader.next_window()[0] for _ in range(n)]
        self.B = loader.micro_batch_size

    def __len__(self):
        return len(self.batches) * self.B

    def __getitem__(self, i):
        b = self.batches[i // self.B]
        return {"input_ids": b["input_ids"][i % self.B], "labels": b["input_ids"][i % self.B]}


class StepClock(TrainerCallback):
    """Times steps after the first 10 (engine start-up and warm-up are not throughput)."""

    def __init__(self):
        self.t10 = self.t_end = None

    def on_step_end(self, args, state, control, **kw):
        torch.cuda.synchronize()
        if state.global_step == 10:
            self.t10 = time.time()
        self.t_end = time.time()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--ds-config", default="ds_configs/zero2.json")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    cfg = load_config(REPO / "recipes" / "configs" / "pretrain_gpt.yaml", a.overrides)
    tokenizer, data_dir = prepare_data(cfg.data, Path.home() / ".cache" / "zerokit")
    t = cfg.train
    model = build_causal_lm(cfg.model.preset, None, len(tokenizer), cfg.data.block_size, 0.0, False, t.seed,
                            tokenizer.eos_token_id)
    loader = BlockLoader(data_dir, "train", cfg.data.block_size, t.micro_batch_size, 1, 0, 1, t.seed)
    args = TrainingArguments(output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=t.micro_batch_size,
                             learning_rate=t.lr, warmup_steps=10, bf16=True, deepspeed=a.ds_config, logging_steps=10,
                             save_strategy="no", report_to=[], dataloader_pin_memory=True, max_grad_norm=t.grad_clip)
    clock = StepClock()
    trainer = Trainer(model=model, args=args, train_dataset=Windows(loader, 64), callbacks=[clock])
    result = trainer.train()
    seconds = clock.t_end - clock.t10
    world = args.world_size
    tokens = (a.steps - 10) * t.micro_batch_size * cfg.data.block_size * world
    if args.process_index == 0:
        peak = peak_flops(torch.device("cuda", 0))
        tok_s = tokens / seconds
        Path(a.out, "summary.json").write_text(json.dumps({
            "tokens_per_s": tok_s, "world_size": world, "train_seconds": seconds, "loss": result.training_loss,
            "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20,
            "mfu": model_flops_per_token(model, cfg.data.block_size) * tok_s / (peak * world) if peak else None}))


if __name__ == "__main__":
    main()
