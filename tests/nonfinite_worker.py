"""Pre-training runs with one batch poisoned (its loss times NaN, on one rank) or dropped from the data
stream: the runs tests/test_nonfinite.py compares. Several runs share one launch (one process group).

    torchrun --nproc_per_node 2 tests/nonfinite_worker.py runs.json
runs.json: a list of {"overrides": [key=value...], "poison_step": k, "poison_rank": r, "drop_step": k,
"weights": path}, all but overrides optional (steps count from 1). Like the recipes, a UsageError
prints one `error:` line and exits with status 2.
"""
import json
import os
import sys
from pathlib import Path

import torch

from zerokit.backends import make_backend
from zerokit.config import load_config
from zerokit.data.packed import BlockLoader
from zerokit.dist import barrier, init_distributed, shutdown
from zerokit.errors import UsageError
from zerokit.finetuning import gather_parameters
from zerokit.loop import train
from zerokit.models import build_causal_lm
from zerokit.pretraining import PretrainTask, prepare_data
from zerokit.recipe import setup_logging

DEFAULTS = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "pretrain_gpt.yaml"


class PoisonedTask:
    """The task, except that on `rank` the loss of step `step`'s micro-batches is multiplied by NaN
    (so its gradients are NaN too). Evaluation is untouched."""

    def __init__(self, task, step: int | None, rank: int, my_rank: int, grad_accum: int):
        self.task, self.step, self.poison = task, step, rank == my_rank
        self.grad_accum, self.calls = grad_accum, 0

    def loss(self, model, batch):
        loss, n = self.task.loss(model, batch)
        at_step = self.calls // self.grad_accum + 1
        self.calls += 1
        return (loss * float("nan") if self.poison and at_step == self.step else loss), n

    def evaluate(self, *args, **kw):
        return self.task.evaluate(*args, **kw)


class DroppingLoader:
    """The loader with window `step` of the stream left out: the reference for a skipped update."""

    def __init__(self, loader, step: int | None):
        self.loader, self.step, self.served = loader, step, 0

    def next_window(self):
        self.served += 1
        if self.served == self.step:
            self.loader.next_window()
        return self.loader.next_window()

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)


def run_one(spec: dict) -> None:
    cfg = load_config(DEFAULTS, spec["overrides"])
    t, d = cfg.train, cfg.data
    info = init_distributed(t.dist_timeout_s, t.cpu_threads)
    if not info.is_main:  # rank 0 tokenizes and packs first, as the recipe does
        barrier()
    tokenizer, data_dir = prepare_data(d, Path(d.cache_dir))
    if info.is_main:
        barrier()
    model = build_causal_lm(cfg.model.preset, None, len(tokenizer), d.block_size, cfg.model.dropout, False, t.seed,
                            tokenizer.eos_token_id)
    backend = make_backend(model, t, info, cfg.ds_config, cfg.fsdp)
    loader = BlockLoader(data_dir, "train", d.block_size, t.micro_batch_size, t.grad_accum, info.rank, info.world_size, t.seed)
    task = PoisonedTask(PretrainTask(data_dir, d.block_size, t.micro_batch_size, d.eval_batches),
                        spec.get("poison_step"), spec.get("poison_rank", 0), info.rank, t.grad_accum)
    train(cfg, backend=backend, task=task, loader=DroppingLoader(loader, spec.get("drop_step")), info=info,
          seq_len=d.block_size)
    if spec.get("weights"):
        state = gather_parameters(backend.module, {n for n, _ in backend.module.named_parameters()})
        if info.is_main:
            torch.save(state, spec["weights"])


def main() -> int:
    setup_logging(int(os.environ.get("RANK", "0")))
    status = 0
    try:
        for spec in json.loads(Path(sys.argv[1]).read_text()):
            run_one(spec)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        status = 2
    finally:
        shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # as the recipes do on several ranks: no C++ teardown of DeepSpeed/gloo threads


if __name__ == "__main__":
    main()
