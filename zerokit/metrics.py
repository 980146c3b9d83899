"""What a run reports: FLOPs and MFU, peak memory, and the writers (metrics.jsonl,
TensorBoard, W&B) behind one `MetricsLogger`. Every number a user sees is computed here."""
from __future__ import annotations

import json
import math
import os
import resource
import secrets
import sys
from pathlib import Path

import torch

from zerokit.moe import inactive_params

# Dense bf16 peak FLOP/s by GPU name (vendor datasheets, no sparsity).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
              "L4": 121e12, "V100": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def flops_per_token(n_params: int, n_layer: int, n_head: int, head_dim: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls against the weights (forward 2N, backward 4N)
    plus 12·L·H·Q·T for the attention score and value products (PaLM, appendix B)."""
    return 6 * n_params + 12 * n_layer * n_head * head_dim * seq_len


def matmul_params(model: torch.nn.Module) -> int:
    """N of the formula: parameters that multiply activations. Embedding lookups are not FLOPs,
    so embedding tables count only when tied to the output projection (GPT-2's wte)."""
    out = model.get_output_embeddings()
    head = out.weight if out is not None else None
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.weight is not head}
    params = {id(p): p for p in model.parameters() if id(p) not in lookups}  # dedupe tied weights
    return sum(getattr(p, "ds_numel", p.numel()) for p in params.values())


def model_flops_per_token(model: torch.nn.Module, seq_len: int) -> float | None:
    """None for encoder-decoders: their tokens split between two stacks, which one formula does not describe.
    A mixture of experts counts its active parameters: a token runs top_k of the num_experts experts."""
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        return None
    n_layer = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    n_head = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    return flops_per_token(matmul_params(model) - inactive_params(model), n_layer, n_head, hidden // n_head, seq_len)


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device, when known (pass train.peak_tflops for others, e.g. CPUs)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_FLOPS.items():
            if key in name:
                return value
    return None


def peak_memory_mb(device: torch.device) -> float:
    """GPU allocator peak on CUDA; the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024


def system_stats(device: torch.device) -> dict:
    """Per-log-step system stats: GPU utilisation and memory through NVML, or CPU RSS."""
    if device.type == "cuda":
        try:
            import pynvml
            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            util = pynvml.nvmlDeviceGetUtilizationRates(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            return {"gpu_util": util.gpu, "gpu_mem_used_mb": mem.used / 2**20}
        except Exception:  # NVML missing or unsupported: the allocator numbers still stand
            return {}
    import psutil
    return {"rss_mb": psutil.Process().memory_info().rss / 2**20}


def finite_or_none(value):
    """`value` with every NaN/inf float (in nested dicts and lists too) replaced by None: JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def json_line(record: dict, **kw) -> str:
    """Strict JSON (never bare NaN or Infinity, which json.loads elsewhere rejects): non-finite numbers are null."""
    return json.dumps(finite_or_none(record), allow_nan=False, **kw)


class MetricsLogger:
    """metrics.jsonl always; TensorBoard and W&B when named in `report_to` (rank 0 only)."""

    def __init__(self, run_dir: Path, report_to: str, config: dict, enabled: bool, run_name: str = "zerokit",
                 prometheus_port: int = 0, start_step: int = 0):
        self.enabled = enabled
        self.tb = self.wandb = self.gauges = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # A new run starts the file afresh; a resumed one keeps the lines up to its checkpoint (those
        # after it, from the interrupted run, are about to be logged again).
        # The kept lines go to a temporary file renamed over the old one, so a kill at any moment
        # leaves either the old history or the trimmed one, never an empty file.
        path = run_dir / "metrics.jsonl"
        kept = [ln.rstrip("\n") + "\n" for ln in path.read_text().splitlines()
                if start_step and logged_step(ln) <= start_step] if path.is_file() else []
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self.file = open(path, "a")
        targets = {t.strip() for t in (report_to or "").split(",") if t.strip() and t.strip() != "none"}
        unknown = targets - {"tensorboard", "wandb"}
        if unknown:
            from zerokit.errors import UsageError
            raise UsageError(f"report_to: unknown target(s) {sorted(unknown)}; use tensorboard, wandb, both (comma-separated) or none")
        if "tensorboard" in targets:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if prometheus_port:  # for clusters that scrape: every numeric metric as a gauge zerokit_<name>
            import prometheus_client
            self.registry = prometheus_client.CollectorRegistry()
            self.gauges = {}
            prometheus_client.start_http_server(prometheus_port, registry=self.registry)
        if "wandb" in targets:
            import wandb  # honours WANDB_MODE=offline; the API key stays in the environment, never in config
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "zerokit"), name=run_name,
                                    id=wandb_run_id(run_dir, resumed=start_step > 0), dir=str(run_dir),
                                    config=config, resume="allow")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = finite_or_none(record)
        self.file.write(json_line(record) + "\n")
        self.file.flush()
        step = record.get("step", 0)
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb:
            self.wandb.log(scalars, step=step)
        if self.gauges is not None:
            import prometheus_client
            for k, v in {**scalars, "step": step}.items():
                if k not in self.gauges:
                    self.gauges[k] = prometheus_client.Gauge(f"zerokit_{k}", k, registry=self.registry)
                self.gauges[k].set(v)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def logged_step(line: str) -> float:
    """The step of one metrics.jsonl line; a line torn by a kill mid-write counts as never logged."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return float("inf")


def wandb_run_id(run_dir: Path, resumed: bool) -> str:
    """The W&B run id kept in <run_dir>/wandb_run_id: a resumed run continues the same W&B run (one
    curve across preemptions); a fresh start gets a new id."""
    path = run_dir / "wandb_run_id"
    if resumed and path.is_file() and path.read_text().strip():  # empty if a kill tore the first write
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # W&B ids are lower-case letters and digits
    path.with_name(path.name + ".tmp").write_text(run_id)
    os.replace(path.with_name(path.name + ".tmp"), path)
    return run_id


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, file=sys.stderr,
                unit="step", mininterval=1.0)
