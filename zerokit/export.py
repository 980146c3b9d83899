"""`zerokit export <checkpoint_dir> <out_dir>`: any checkpoint a recipe writes (pre-training or
fine-tuning; full, LoRA or QLoRA; plain/DDP, DeepSpeed ZeRO 0-3, FSDP2) -> a Hugging Face model
directory (config, safetensors weights, tokenizer, generation config), plus `<out_dir>/adapter`
(peft) for LoRA/QLoRA runs.

The weights are the fp32 master weights, whatever precision the run trained in: DeepSpeed ZeRO 1-3
shards are merged by DeepSpeed's own zero_to_fp32 (those of its BF16_Optimizer, which zero_to_fp32
refuses, here); a ZeRO-0 bf16/fp16 checkpoint keeps its masters in the optimizer state (the module
copy is 16-bit); DCP checkpoints (plain, FSDP) hold fp32 params. Runs in one process, no process
group. The same assembly and saving serve the end-of-run export of the fine-tuning recipes
(zerokit/finetuning.py), which reads the masters from the live engine.

What a checkpoint carries for export, in <ckpt>/model/: config.json (the full-precision model),
the tokenizer, and for fine-tuning runs export.json (task kind, base model, peft mode) with the run's
LoRA layout in peft/adapter_config.json. A LoRA export loads the frozen base from the recorded path
(the checkpoint holds only what training changed); a full fine-tune needs only the checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from zerokit.backends.deepspeed import load_deepspeed_file
from zerokit.errors import UsageError

SPEC_FILE, PEFT_DIR = "export.json", "peft"


@dataclass
class ModelSpec:
    """What, besides the weights, rebuilds the trained model. Pre-training checkpoints have no
    export.json: a causal LM from config.json."""
    kind: str = "causal_lm"   # causal_lm | seq_cls | seq2seq
    peft: str = "none"        # none | lora | qlora
    base: str | None = None   # the base model folder or hub name (LoRA needs its frozen weights)


# ----------------------------------------------------------------------------- what a checkpoint carries

def write_model_info(model_dir: Path, spec: ModelSpec, config, tokenizer, lora_config=None) -> None:
    """<ckpt>/model: the model config, tokenizer, export.json and the LoRA layout (rank 0, in write_extras)."""
    model_dir = Path(model_dir)
    config.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (model_dir / SPEC_FILE).write_text(json.dumps(asdict(spec), indent=1))
    if lora_config is not None:
        lora_config.save_pretrained(model_dir / PEFT_DIR)


def read_model_info(ckpt: Path, base: str | None = None):
    """(spec, config, LoRA config or None) of a checkpoint; `base` overrides the recorded base path."""
    model_dir = ckpt / "model"
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"{model_dir}/config.json missing: the checkpoint lacks its model config (written by an "
                         f"older zerokit?); export a checkpoint that a current zerokit recipe wrote")
    spec_file = model_dir / SPEC_FILE
    spec = ModelSpec(**json.loads(spec_file.read_text())) if spec_file.is_file() else ModelSpec()
    if base:
        spec.base = base
    lora = None
    if spec.peft != "none":
        from peft import LoraConfig
        if not (model_dir / PEFT_DIR / "adapter_config.json").is_file():
            raise UsageError(f"{model_dir}/{PEFT_DIR}/adapter_config.json missing: this {spec.peft} checkpoint lacks "
                             f"its LoRA layout; export a checkpoint that a current zerokit recipe wrote")
        lora = LoraConfig.from_pretrained(str(model_dir / PEFT_DIR))
        if base:
            lora.base_model_name_or_path = base
    from transformers import AutoConfig
    return spec, AutoConfig.from_pretrained(model_dir), lora


# ----------------------------------------------------------------------------- the fp32 weights of a checkpoint

def checkpoint_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The fp32 (master) weights of a checkpoint directory written by the loop, by parameter name
    (a LoRA run's DeepSpeed ZeRO 1-3 checkpoint: the trained ones only)."""
    ckpt = Path(ckpt)
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
    if is_bf16_optimizer(tag_dir):
        return bf16_optimizer_weights(tag_dir)
    if any(tag_dir.glob("*optim_states.pt")):  # ZeRO 1-3: merge the partitioned fp32 master copy
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        spec_file = ckpt / "model" / SPEC_FILE
        lora = spec_file.is_file() and json.loads(spec_file.read_text()).get("peft", "none") != "none"
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per step of the merge
            # LoRA: the frozen base comes from the base model (a 4-bit QLoRA base would not merge anyway).
            return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="deepspeed",
                                                                 exclude_frozen_parameters=lora))
    states = tag_dir / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise UsageError(f"{tag_dir} holds no DeepSpeed model states; pass a complete checkpoint folder")
    # ZeRO-0 keeps the module (in the training dtype) in the model-states file, and under bf16/fp16 the
    # fp32 masters in the optimizer state, in optimizer order and without names.
    state = load_deepspeed_file(states)
    weights = {k: v.float() for k, v in state["module"].items()}
    opt = state.get("optimizer") or {}
    if "fp32_groups" in opt or "fp32_groups_flat" in opt:
        weights.update(zero0_masters(opt, state["module"], layout_model(*read_model_info(ckpt))))
    return weights


def is_bf16_optimizer(tag_dir: Path) -> bool:
    """DeepSpeed's BF16_Optimizer wrote the optimizer files (ZeRO 1-3 under bf16 share their name)."""
    first = sorted(tag_dir.glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    if not first:
        return False
    opt = load_deepspeed_file(first[0], mmap=True)["optimizer_state_dict"]
    return "zero_stage" not in opt and "param_slice_mappings" in opt


def bf16_optimizer_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's BF16_Optimizer (ZeRO-1 with bf16 weights and fp32 gradient accumulation) records no
    zero stage, which zero_to_fp32 refuses; it does save, per rank and group, where each parameter's
    piece lies in its fp32 partition. A parameter's pieces, in rank order, are the whole master."""
    import re
    state = load_deepspeed_file(tag_dir / "mp_rank_00_model_states.pt")
    weights = {k: v.float() for k, v in state["module"].items()}  # buffers and frozen parameters
    shapes = {n: shape for group in state["param_shapes"] for n, shape in group.items()}
    files = sorted(tag_dir.glob("bf16_zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                   key=lambda f: int(re.search(r"rank_(\d+)_mp", f.name).group(1)))
    pieces: dict[str, list[torch.Tensor]] = {}
    for f in files:
        opt = load_deepspeed_file(f)["optimizer_state_dict"]
        for flat, mapping in zip(opt["single_partition_of_fp32_groups"], opt["param_slice_mappings"]):
            for name, frag in mapping.items():
                pieces.setdefault(name, []).append(flat.narrow(0, frag.start, frag.numel))
    weights.update({n: torch.cat(p).view(shapes[n]).clone() for n, p in pieces.items()})
    return weights


def zero0_masters(opt: dict, module_state: dict, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Name the fp32 masters of DeepSpeed's FP16_(Unfused)Optimizer (ZeRO-0 under bf16/fp16). Its groups
    are the engine's optimizer groups: zerokit's (zerokit.optim.param_groups) or, for an optimizer from
    the DeepSpeed JSON, one group of every trainable parameter. Each master must be the one its 16-bit
    module copy was rounded from, so a wrong naming cannot pass silently."""
    from zerokit.optim import param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    groups = opt.get("fp32_groups") or [[flat] for flat in opt["fp32_groups_flat"]]  # fused: one flat tensor a group
    layouts = ([[names[id(p)] for p in g["params"]] for g in param_groups(model, 0.0)],
               [[n for n, p in model.named_parameters() if p.requires_grad]])
    for layout in layouts:
        found = _match_masters(groups, layout, module_state)
        if found is not None:
            return found
    raise RuntimeError("cannot match the ZeRO-0 optimizer's fp32 masters to the model's parameters "
                       "(its groups are neither zerokit's nor one group of all trainable parameters)")


def _match_masters(groups: list, layout: list[list[str]], module_state: dict) -> dict | None:
    if len(groups) != len(layout):
        return None
    out = {}
    for masters, group_names in zip(groups, layout):
        lps = [module_state[n] for n in group_names]
        if len(masters) == 1 and len(lps) > 1:  # a flat group: split by the 16-bit copies' sizes
            sizes = [lp.numel() for lp in lps]
            if masters[0].numel() < sum(sizes):
                return None
            masters = masters[0][:sum(sizes)].split(sizes)
        if len(masters) != len(lps):
            return None
        for name, master, lp in zip(group_names, masters, lps):
            if master.numel() != lp.numel() or not torch.equal(master.reshape(lp.shape).to(lp.dtype), lp):
                return None
            out[name] = master.reshape(lp.shape).float().clone()
    return out


def layout_model(spec: ModelSpec, config, lora_config):
    """The trained model's parameters (names, shapes, trainable) without its weights: meta tensors."""
    from zerokit.peft_setup import _auto_class
    with torch.device("meta"):
        model = _auto_class(spec.kind).from_config(config)
        if lora_config is not None:
            from peft import get_peft_model
            layout = copy.deepcopy(lora_config)
            layout.base_model_name_or_path = None  # no base is loaded here (peft would warn of a rename)
            model = get_peft_model(model, layout)
    return model


# ----------------------------------------------------------------------------- assembling and saving

def trained_model(spec: ModelSpec, config, lora_config, state: dict[str, torch.Tensor]):
    """A full-precision model holding the trained `state`. Full fine-tuning / pre-training: built from the
    config (every weight is in `state`). LoRA/QLoRA: the full-precision base (+ the run's LoRA layout)
    with the trained LoRA weights and heads; a QLoRA adapter is thus merged into the full-precision
    base, not into its 4-bit copy (that would requantise the sum)."""
    from zerokit.peft_setup import _auto_class
    if spec.peft == "none":
        with torch.device("meta"):
            model = _auto_class(spec.kind).from_config(config)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        tied = set(getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or [])
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint does not match the model config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.tie_weights()
        meta = [n for n, p in model.named_parameters() if p.is_meta]
        if meta:
            raise RuntimeError(f"checkpoint lacks weights {meta[:5]}")
        return model.eval()
    from peft import get_peft_model
    model = get_peft_model(base_model(spec, config), copy.deepcopy(lora_config))
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    state = {k: v for k, v in state.items() if k in expected}
    if expected != state.keys():
        raise RuntimeError(f"the checkpoint lacks trained weights {sorted(expected - state.keys())[:5]}")
    model.load_state_dict(state, strict=False)
    return model.eval()


def base_model(spec: ModelSpec, config):
    """The full-precision base a LoRA run started from, with the run's config (labels, pad token)."""
    from zerokit.peft_setup import _auto_class
    base = spec.base
    if not base or (not Path(base).exists() and (base.startswith(("/", ".", "~")) or base.count("/") > 1)):
        raise UsageError(f"the base model {base} this {spec.peft} checkpoint was trained from is missing; "
                         f"restore it there or pass --base DIR")
    try:
        return _auto_class(spec.kind).from_pretrained(base, config=config, dtype=torch.float32)
    except OSError as e:
        raise UsageError(f"cannot load the base model {base} ({' '.join(str(e).split())[:200]}); pass --base DIR") from None


@contextlib.contextmanager
def atomic_dir(final: Path):
    """Write into <final>.tmp, then rename: `final` is never half-written. An earlier `final` is replaced."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def save_adapter_dir(model, out: Path, tokenizer) -> None:
    """The LoRA adapter (peft's files) and the tokenizer, in fp32."""
    from zerokit.peft_setup import save_adapter
    save_adapter(model, out, tokenizer)


def save_model_dir(model, out: Path, tokenizer, dtype: torch.dtype = torch.float32) -> None:
    """Weights `from_pretrained` loads without peft (LoRA merged in fp32 first), tokenizer, generation
    config. A peft model is consumed by the merge: save its adapter before."""
    from peft import PeftModel
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    model.to(dtype).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


# ----------------------------------------------------------------------------- the command

def export(ckpt: str | Path, out_dir: str | Path, dtype: str = "float32", base: str | None = None) -> Path:
    from transformers import AutoTokenizer
    ckpt, out_dir = Path(ckpt), Path(out_dir)
    if not ckpt.is_dir():
        raise UsageError(f"checkpoint {ckpt} not found; pass an existing <run_dir>/checkpoints/step_N folder")
    if not (ckpt / "trainer_state.json").is_file():
        raise UsageError(f"{ckpt} is not a zerokit checkpoint (no trainer_state.json); pass <run_dir>/checkpoints/step_N")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UsageError(f"{out_dir} already exists; pass a new folder or remove it first")
    spec, config, lora = read_model_info(ckpt, base)
    weights = checkpoint_weights(ckpt)
    model = trained_model(spec, config, lora, weights)
    tokenizer = AutoTokenizer.from_pretrained(ckpt / "model")
    with atomic_dir(out_dir) as tmp:
        if spec.peft != "none":
            save_adapter_dir(model, tmp / "adapter", tokenizer)
        save_model_dir(model, tmp, tokenizer, getattr(torch, dtype))
    return out_dir


def export_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="zerokit export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  zerokit export runs/pretrain_gpt/checkpoints/step_200 exported/gpt "
                                       "--dtype bfloat16")
    p.add_argument("checkpoint", help="<run_dir>/checkpoints/step_N (any recipe, backend and world size)")
    p.add_argument("out_dir", help="where to write the Hugging Face model directory (must not exist yet)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the saved model weights (the LoRA adapter stays fp32)")
    p.add_argument("--base", help="LoRA/QLoRA: the base model, if it moved from the path the run recorded")
    args = p.parse_args(argv)
    out = export(args.checkpoint, args.out_dir, args.dtype, args.base)
    print(f"exported {args.checkpoint} -> {out}")
    return 0
