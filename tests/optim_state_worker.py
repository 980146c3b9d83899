"""One rank of test_optimizers' ZeRO-2 state measurement (torchrun, 2 ranks): for each optimizer, a real
DeepSpeed ZeRO-2 engine built by zerokit's backend trains one step of gpt-tiny, and this rank's optimizer
state bytes (the torch optimizer's tensors, over ZeRO's flat partitions) are printed as JSON."""
import json
import sys

import torch

from zerokit.backends import make_backend
from zerokit.config import Config
from zerokit.dist import init_distributed, shutdown
from zerokit.lab.measure import optimizer_tensors, storage_bytes
from zerokit.models import build_causal_lm
from zerokit.optim import OPTIMIZERS


def main() -> None:
    info = init_distributed(600, 1)
    train = Config(lr=1e-3, betas=[0.9, 0.99], eps=1e-8, weight_decay=0.1, micro_batch_size=2, grad_accum=1,
                   grad_clip=1.0, precision="fp32")
    out = {}
    for name in OPTIMIZERS:
        model = build_causal_lm("gpt-tiny", None, 512, 32, 0.0, False, 0, 0)
        backend = make_backend(model, train, info, ds_config=sys.argv[1], optim={"name": name, "muon_lr": 0.02})
        ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(info.rank))
        backend.backward(backend.model(input_ids=ids, labels=ids).loss, sync=True)
        backend.step()
        out[name] = storage_bytes(optimizer_tensors(backend.optimizer))
    print(f"RESULT{info.rank}=" + json.dumps(out), flush=True)
    shutdown()


if __name__ == "__main__":
    main()
