"""`zerokit export <checkpoint_dir> <out_dir>`: a checkpoint of any backend -> a Hugging Face
model directory (config, safetensors weights, tokenizer, generation config).

Runs in one process with no process group: DeepSpeed shards are consolidated by DeepSpeed's
own zero_to_fp32 (fp32 master weights, every stage), DCP checkpoints (plain, FSDP) by
torch.distributed.checkpoint's format utilities."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from zerokit.errors import UsageError


def checkpoint_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict of a checkpoint directory written by the loop."""
    state_file = ckpt / "trainer_state.json"
    if not state_file.is_file():
        raise UsageError(f"{ckpt} is not a zerokit checkpoint (no trainer_state.json); pass <run_dir>/checkpoints/step_N")
    backend = json.loads(state_file.read_text())["backend"]
    if backend == "deepspeed":
        return deepspeed_weights(ckpt)
    from zerokit.backends.dcp import dcp_model_weights
    return dcp_model_weights(ckpt)


def deepspeed_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    tag_dir = ckpt / "deepspeed"
    if any(tag_dir.glob("*optim_states.pt")):  # ZeRO 1-3: merge the partitioned fp32 master copy
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="deepspeed"))
    # ZeRO-0 keeps the whole module (in the training dtype) in the model-states file.
    state = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in state["module"].items()}


def export(ckpt: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    ckpt, out_dir = Path(ckpt), Path(out_dir)
    if not (ckpt / "model" / "config.json").is_file():
        raise UsageError(f"{ckpt}/model/config.json missing: the checkpoint lacks its model config; "
                         f"pass a checkpoint written by a zerokit recipe")
    config = AutoConfig.from_pretrained(ckpt / "model")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    weights = checkpoint_weights(ckpt)
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    tied = set(getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.to(getattr(torch, dtype))
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(ckpt / "model").save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    return out_dir


def export_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="zerokit export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="<run_dir>/checkpoints/step_N (any backend, any world size)")
    p.add_argument("out_dir", help="where to write the Hugging Face model directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    out = export(args.checkpoint, args.out_dir, args.dtype)
    print(f"exported {args.checkpoint} -> {out}")
    return 0
