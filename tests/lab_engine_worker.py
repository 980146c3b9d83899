"""One rank (started by test_memory through launch_util.run, RANK/WORLD_SIZE in its environment): the
same small GPT's training step measured by `measure_step_peak` twice, as a plain PyTorch AdamW step and
through a real DeepSpeed ZeRO-0 engine (engine.backward / engine.step); prints both results as JSON."""
import json
import sys

import torch
from transformers import GPT2LMHeadModel

from lab_fixtures import small_gpt2
from zerokit.lab.measure import measure_step_peak

L, H, HEADS, V, S = 2, 128, 4, 1024, 128


def fresh():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(small_gpt2(L, H, HEADS, S, V, attn="sdpa")).train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def main() -> None:
    import deepspeed

    torch.set_num_threads(1)
    ids = torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    model, opt = fresh()
    plain = measure_step_peak(model, batch, opt)
    model, opt = fresh()
    deepspeed.init_distributed(dist_backend="gloo")
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 0},
        "steps_per_print": 10**9})
    before = next(engine.module.parameters()).detach().clone()
    ds = measure_step_peak(engine.module, batch, engine, backward=engine.backward, step=engine.step)
    ds.update(global_steps=engine.global_steps, params_changed=not torch.equal(before, next(engine.module.parameters())),
              params=sum(p.numel() for p in engine.module.parameters()), optimizer_type=type(engine.optimizer).__name__)
    print("RESULT=" + json.dumps({"plain": plain, "deepspeed": ds}), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
