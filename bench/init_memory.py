"""One rank of bench/init_memory.sh: start a run's model the way recipes/pretrain_gpt.py does (the init plan,
the build, the engine; no training step) and print this rank's host memory as one JSON line.

    torchrun --nproc_per_node 2 bench/init_memory.py model.preset=llama-0.5b fsdp=full_shard model.sharded_init=true
"""
import json
import resource
import sys
import time
from pathlib import Path

from zerokit.backends import make_backend
from zerokit.backends.init_plan import plan
from zerokit.config import load_config
from zerokit.dist import exit_process, init_distributed, shutdown
from zerokit.models import build_causal_lm, count_params

RECIPE_YAML = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "pretrain_gpt.yaml"


def rss_mb() -> float:
    """The resident set now (/proc), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_mb() -> float:
    """The process's peak resident set so far (ru_maxrss, KiB on Linux), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    cfg = load_config(RECIPE_YAML, ["optim.name=adamw", "train.micro_batch_size=1", *sys.argv[1:]])
    info = init_distributed(cfg.train.dist_timeout_s, cfg.train.cpu_threads)
    before = rss_mb()  # imports and the process group: the constant every rank pays anyway
    t0 = time.perf_counter()
    init, zero_init = plan(cfg, info)
    m = cfg.model
    model = build_causal_lm(m.preset, None, None, None, m.dropout, False, cfg.train.seed, None, m.attn,
                            m.sdpa_backend, None, None, init, zero_init)
    params = count_params(model)
    built = peak_rss_mb()  # the model built (meta, partitioned or whole), no engine yet
    backend = make_backend(model, cfg.train, info, cfg.ds_config, cfg.fsdp, optim=cfg.optim)
    seconds = time.perf_counter() - t0
    print(json.dumps({"rank": info.rank, "world_size": info.world_size, "engine": backend.name, "init": init,
                      "params": params, "fp32_mb": params * 4 / 2**20, "rss_before_mb": before,
                      "built_peak_mb": built, "peak_rss_mb": peak_rss_mb(), "rss_after_mb": rss_mb(), "seconds": seconds}), flush=True)
    shutdown()


if __name__ == "__main__":
    main()
    exit_process(0)
