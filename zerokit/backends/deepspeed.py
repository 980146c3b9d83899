"""DeepSpeed ZeRO 0-3 (and offload) from a plain DeepSpeed JSON.

`"auto"` values are filled from the run config here, the one place that does it; a
value written out in the JSON that contradicts the run is a UsageError rather than a
silent override (DeepSpeed itself would, e.g., clip gradients at 1.0 when the JSON
omits `gradient_clipping`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator

import torch

from zerokit.backends.common import check_accelerate_flags, resolve_precision
from zerokit.dist import DistInfo
from zerokit.errors import UsageError, read_settings_text
from zerokit.locks import exclusive
from zerokit.optim import build_optimizer, check_engine, set_lrs
from zerokit.sharded_init import fp32_inits

log = logging.getLogger("zerokit")


def load_deepspeed_file(path: str | Path, **kwargs):
    """torch.load of a file DeepSpeed wrote, with weights_only=True: besides tensors and plain containers
    DeepSpeed pickles only these classes, allowed by name, so no other pickled code can run."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]):
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)


def load_ds_json(path: str | Path) -> dict:
    text = read_settings_text(path, "DeepSpeed config", "pass an existing JSON, e.g. ds_config=ds_configs/zero2.json")
    try:
        ds = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"malformed DeepSpeed JSON {path} (line {e.lineno}, column {e.colno}): {e.msg}; "
                         "fix the file's syntax") from None
    if not isinstance(ds, dict):
        raise UsageError(f"DeepSpeed config {path} holds a JSON {type(ds).__name__}, not an object of settings; "
                         "write it as {\"zero_optimization\": {\"stage\": 2}, ...} (see ds_configs/)")
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise UsageError(f"DeepSpeed config {path}: zero_optimization must be an object, not {zero!r}; "
                         "write e.g. \"zero_optimization\": {\"stage\": 2}")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise UsageError(f"DeepSpeed config {path}: zero_optimization.stage={stage!r} is not a ZeRO stage; "
                         "set it to 0, 1, 2 or 3")
    return ds


def _fill(section: dict, key: str, value, where: str, fix: str) -> None:
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
    elif current != value:
        raise UsageError(f"DeepSpeed config sets {where}{key}={current!r} but the run needs {value!r}; "
                         f"set it to \"auto\" in the JSON or {fix}")


def resolve_ds_config(ds: dict, train, world_size: int, hidden_size: int | None, precision: str) -> dict:
    """Fill "auto" values from the run and reject values that contradict it."""
    ds = json.loads(json.dumps(ds))  # a private copy
    mb, ga = train.micro_batch_size, train.grad_accum
    _fill(ds, "train_micro_batch_size_per_gpu", mb, "", f"set train.micro_batch_size={ds.get('train_micro_batch_size_per_gpu')}")
    _fill(ds, "gradient_accumulation_steps", ga, "", f"set train.grad_accum={ds.get('gradient_accumulation_steps')}")
    _fill(ds, "train_batch_size", mb * ga * world_size, "",
          f"make train.micro_batch_size x train.grad_accum x {world_size} ranks equal it")
    _fill(ds, "gradient_clipping", float(train.grad_clip), "", f"set train.grad_clip={ds.get('gradient_clipping')}")
    for key, on in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        sec = ds.setdefault(key, {})
        _fill(sec, "enabled", on, f"{key}.", f"set train.precision={'bf16' if key == 'bf16' and sec.get('enabled') else precision}")
    if "optimizer" in ds:  # the user wants DeepSpeed's own optimizer; feed it the run's hyper-parameters
        params = ds["optimizer"].setdefault("params", {})
        for key, value in (("lr", train.lr), ("betas", list(train.betas)), ("eps", train.eps),
                           ("weight_decay", train.weight_decay)):
            _fill(params, key, value, "optimizer.params.", f"set train.{key}")
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    fill_precision_types(ds, precision, train.grad_accum)
    if hidden_size:
        for key, value in auto_bucket_sizes(hidden_size).items():
            if zero.get(key) == "auto":
                zero[key] = value
    return ds


# ZeRO bucket sizes (in elements) that "auto" resolves to, derived from the model width h as Hugging Face's
# DeepSpeed integration does (transformers.integrations.deepspeed). The one place these rules live: the
# lab's estimator imports them from here.
AUTO_REDUCE_BUCKET_PER_H2 = 1.0      # reduce_bucket_size = h*h
AUTO_PREFETCH_BUCKET_PER_H2 = 0.9    # stage3_prefetch_bucket_size = 0.9*h*h
AUTO_PERSISTENCE_PER_H = 10          # stage3_param_persistence_threshold = 10*h: smaller parameters stay whole
# What DeepSpeed 0.19.8 uses when the JSON leaves a key out (deepspeed/runtime/zero/config.py).
DEEPSPEED_DEFAULT_BUCKETS = {"reduce_bucket_size": int(5e8), "allgather_bucket_size": int(5e8),
                             "stage3_prefetch_bucket_size": int(5e7), "stage3_param_persistence_threshold": int(1e5)}


def auto_bucket_sizes(hidden_size: int) -> dict[str, int]:
    """The bucket sizes "auto" means for a model of width `hidden_size`."""
    return {"reduce_bucket_size": int(AUTO_REDUCE_BUCKET_PER_H2 * hidden_size * hidden_size),
            "stage3_prefetch_bucket_size": int(AUTO_PREFETCH_BUCKET_PER_H2 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": AUTO_PERSISTENCE_PER_H * hidden_size}


def fill_precision_types(ds: dict, precision: str, grad_accum: int) -> None:
    """Gradients accumulate and reduce in fp32 under bf16/fp16. Left out, DeepSpeed 0.19.8 does both in the
    model's 16-bit dtype (engine.get_data_types, engine.communication_data_type). ZeRO 1-3 accumulate in fp32
    with bf16 and fp16 (stage_1_and_2 / stage3 `gradient_accumulation_dtype`; bf16 ZeRO-1 goes through
    BF16_Optimizer). ZeRO-0 cannot: any accumulation dtype but the model's is a NotImplementedError
    (`_do_optimizer_sanity_check`); it sums the all-reduce in fp32 but stores the result in the 16-bit grads,
    which is one rounding, as in a single process, so only accumulation (grad_accum > 1) is refused there.
    An explicit value in the JSON is the user's choice and is kept."""
    if precision not in ("bf16", "fp16"):
        return
    if ds.get("communication_data_type", "auto") == "auto":
        ds["communication_data_type"] = "fp32"
    types = ds.setdefault("data_types", {})
    accum = types.get("grad_accum_dtype", "auto")
    if int(ds["zero_optimization"].get("stage", 0)) > 0:
        if accum == "auto":
            types["grad_accum_dtype"] = "fp32"
        return
    if accum not in ("auto", precision):
        raise UsageError(f"DeepSpeed ZeRO-0 cannot accumulate {precision} gradients in {accum}, only in {precision}; "
                         f"use ZeRO-1 (ds_configs/zero1.json) or the plain backend (DDP: drop ds_config)")
    types.pop("grad_accum_dtype", None)
    if not types:
        del ds["data_types"]
    if grad_accum > 1 and accum == "auto":
        raise UsageError(f"DeepSpeed ZeRO-0 would accumulate the {grad_accum} micro-batches' gradients in {precision}; "
                         f"use ZeRO-1 (ds_configs/zero1.json: fp32 accumulation, less memory), the plain backend "
                         f"(DDP: drop ds_config), or accept it with \"data_types\": {{\"grad_accum_dtype\": "
                         f"\"{precision}\"}} in the JSON")


def check_fp16_supported(precision: str) -> None:
    """DeepSpeed refuses fp16 where its accelerator lacks it (a CPU without AVX512-FP16: engine._do_sanity_check)."""
    from deepspeed.accelerator import get_accelerator
    if precision == "fp16" and not get_accelerator().is_fp16_supported():
        raise UsageError(f"DeepSpeed has no fp16 on this {get_accelerator().device_name()} device; use "
                         f"train.precision=bf16, or fp16 with the plain backend (no ds_config: GradScaler)")


def offloads_optimizer(ds: dict) -> bool:
    off = ds.get("zero_optimization", {}).get("offload_optimizer", {}) or {}
    return off.get("device", "none") in ("cpu", "nvme")


class DeepSpeedBackend:
    name = "deepspeed"

    def __init__(self, model: torch.nn.Module, train, info: DistInfo, ds: str | dict, optim=None):
        """`ds`: a DeepSpeed JSON's path, or the config accelerate's flags describe (backends.accelerate_deepspeed_config).
        `optim`: the run's optim section (zerokit.optim.build_optimizer)."""
        if info.tensor_parallel > 1:
            raise UsageError(f"parallel.tensor={info.tensor_parallel} is not supported with DeepSpeed here (its AutoTP "
                             f"training is not wired in); use fsdp=full_shard (FSDP2 x tensor parallel) or drop ds_config")
        import deepspeed
        warn_stale_build_locks()
        self.info = info
        os.environ.setdefault("LOCAL_RANK", str(info.local_rank))  # DeepSpeed insists; no launcher sets it for `python`
        self.precision = resolve_precision(train.precision, info.device)
        check_fp16_supported(self.precision)
        hidden = getattr(model.config, "hidden_size", None) if hasattr(model, "config") else None
        ds = load_ds_json(ds) if isinstance(ds, (str, Path)) else ds
        check_accelerate_flags(ds, train)
        self.ds_config = resolve_ds_config(ds, train, info.world_size, hidden, self.precision)
        self.stage = self.ds_config["zero_optimization"].get("stage", 0)
        name = (optim or {}).get("name", "adamw")
        check_engine(name, "deepspeed", offload=offloads_optimizer(self.ds_config), stage=self.stage,
                     json_optimizer="optimizer" in self.ds_config,
                     reduce_scatter=self.ds_config["zero_optimization"].get("reduce_scatter", True))
        optimizer = None
        if "optimizer" not in self.ds_config:
            optimizer = build_optimizer(model, train, optim, engine="deepspeed",
                                        cpu_adam=offloads_optimizer(self.ds_config))
        if name != "adamw":  # ZeRO wraps only the optimizers it lists unless told; these are tested here (tests/test_optimizers.py)
            self.ds_config["zero_allow_untested_optimizer"] = True
        params = [p for p in model.parameters() if p.requires_grad]
        # Built under a 16-bit zero.Init: the fp32 values are recomputed module by module (sharded_init).
        # Else the fp32 tensors themselves (no copy): DeepSpeed replaces each `.data` with its 16-bit cast.
        fp32_weights = fp32_inits(model) if self.precision in ("bf16", "fp16") else {}
        if fp32_weights is None:
            fp32_weights = {id(p): p.data for p in params}
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config,
                                                    model_parameters=params, dist_init_required=False)
        restore_fp32_masters(self.engine, fp32_weights)
        if train.get("compile"):
            self.engine.compile()
        self.model = self.engine
        self.module = self.engine.module
        # The optimizer that holds the hyper-parameters (DeepSpeed wraps it for ZeRO).
        self.optimizer = optimizer or self.engine.optimizer

    def autocast(self):
        # The engine casts weights itself (bf16/fp16 sections, or the mixed-precision policy).
        return contextlib.nullcontext()

    def micro_batch(self, sync: bool):
        # DeepSpeed decides when to reduce from its own micro-step counter (gradient_accumulation_steps).
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        # The loop already divided by the window's token count: no further 1/GAS scaling.
        self.engine.backward(loss, scale_wrt_gas=False)
        if not sync:
            self.engine.step()  # only advances DeepSpeed's micro-step counter inside a window

    def step(self):
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else torch.as_tensor(float(norm))

    @property
    def skipped_updates(self) -> int:
        """Updates the engine refused: fp16 overflow, or (ZeRO, bf16) a non-finite gradient norm."""
        return self.engine.skipped_steps

    def skip_step(self) -> bool:
        """Drop this window's gradients without an update (train.nonfinite=skip); True if none was applied.
        ZeRO and DeepSpeed's bf16/fp16 optimizers refuse a non-finite update themselves; without them the
        engine steps the torch optimizer, which leaves parameters without a gradient alone (the step still
        runs, so the engine's micro-step count stays aligned with the accumulation windows)."""
        if self.engine.zero_optimization() or self.precision != "fp32":
            self.engine.step()
            return not self.engine.was_step_applied()
        for p in self.module.parameters():
            p.grad = None
        config = self.engine._config
        clip, config.gradient_clipping = config.gradient_clipping, 0.0  # its clipping needs a gradient
        try:
            self.engine.step()
        finally:
            config.gradient_clipping = clip
        return True

    def set_lr(self, lr: float) -> None:
        set_lrs(self.optimizer, lr)

    def save(self, path) -> None:
        self.engine.save_checkpoint(str(path), tag="deepspeed", save_latest=False)

    def load(self, path) -> None:
        """Same data-parallel size (or ZeRO-0, whose optimizer state is not partitioned): DeepSpeed's own
        checkpoint. Another size under ZeRO 1-3: its universal checkpoint, converted once (the first rank to get the lock)."""
        path = Path(path)
        if not (path / "deepspeed").is_dir():
            raise UsageError(f"no DeepSpeed checkpoint in {path}/deepspeed; resume from a checkpoint this backend wrote")
        written_by = checkpoint_world_size(path)
        if self.stage == 0 or written_by in (None, self.info.world_size):
            load_path, _ = self.engine.load_checkpoint(str(path), tag="deepspeed", load_optimizer_states=True,
                                                       load_lr_scheduler_states=False)
        else:
            with exclusive(path / UNIVERSAL_TAG):  # the first rank converts; the others then find it done
                to_universal(path)
            with loading_universal(self.engine):
                load_path, _ = self.engine.load_checkpoint(str(path), tag=UNIVERSAL_TAG, load_optimizer_states=True,
                                                           load_lr_scheduler_states=False)
            if self.stage == 3:
                repair_zero3_universal_load(self.engine.optimizer.optimizer, path / UNIVERSAL_TAG)
        if load_path is None:
            raise UsageError(f"no DeepSpeed checkpoint in {path}/deepspeed; resume from a checkpoint this backend wrote")


def zero3_init(ds: str | dict, train, info: DistInfo, hidden_size: int | None):
    """deepspeed.zero.Init for the run's resolved config: each module built under it is partitioned as soon
    as it exists (zerokit.sharded_init), in the run's dtype. Under bf16/fp16 the 16-bit partitions hold the
    init rounded; DeepSpeedBackend then sets the fp32 masters from the exact fp32 init (sharded_init.fp32_inits)."""
    import deepspeed

    from zerokit.sharded_init import partitioning_init
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    deepspeed.comm.init_distributed(dist_init_required=False, verbose=False)  # our group: its config sees N ranks
    ds = load_ds_json(ds) if isinstance(ds, (str, Path)) else ds
    precision = resolve_precision(train.precision, info.device)
    check_fp16_supported(precision)
    resolved = resolve_ds_config(ds, train, info.world_size, hidden_size, precision)
    # No dtype=: DeepSpeed 0.19.8 reads an explicit one as bf16 on an accelerator without fp16 (the CPU:
    # Init._set_dtype's precedence); from the config it is bf16, fp16 or (both off) fp32.
    return partitioning_init(resolved)


def warn_stale_build_locks(max_age_s: float = 900) -> None:
    """DeepSpeed JIT-builds its CPU ops (shm_comm, cpu_adam) under a lock file; a build that was killed
    leaves the lock behind and every later run waits on it forever, silently. Say so before that wait."""
    import time

    from torch.utils.cpp_extension import get_default_build_root
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:  # <dir>/<op>/ when set, else <root>/py311_cpu/<op>/
        with contextlib.suppress(OSError):
            if time.time() - lock.stat().st_mtime > max_age_s:
                log.warning("%s is %.0f min old: a killed DeepSpeed op build left it, and DeepSpeed waits on it "
                            "forever; delete it if no build is running", lock, (time.time() - lock.stat().st_mtime) / 60)


def restore_fp32_masters(engine, fp32_weights: dict | Iterator[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
    """DeepSpeed casts the module to 16 bits and then builds its fp32 masters *from the 16-bit copy*, so the
    masters would start as bf16/fp16-rounded weights (a pretrained model loses its low bits before the
    first step). Write the original fp32 values back into them; the 16-bit weights are unchanged.
    `fp32_weights`: id(param) -> its fp32 tensor, or (ZeRO-3 built under a 16-bit zero.Init) the
    (param, whole fp32 value) pairs sharded_init.fp32_inits computes one module at a time. Each rank
    writes its own partition (stage3 `set_full_hp_param`: no communication)."""
    if isinstance(fp32_weights, dict) and not fp32_weights:
        return
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.utils import safe_set_full_fp32_param
    from torch._utils import _flatten_dense_tensors
    optimizer = engine.optimizer
    if isinstance(optimizer, FP16_Optimizer):  # ZeRO-0 with FusedAdam: one flat fp32 copy per param group
        for flat, group in zip(optimizer.fp32_groups_flat, optimizer.fp16_groups):
            flat.data.copy_(_flatten_dense_tensors([fp32_weights[id(p)] for p in group]))
        return
    if isinstance(optimizer, FP16_UnfusedOptimizer):  # ZeRO-0 with a torch optimizer: one fp32 clone per param
        for masters, group in zip(optimizer.fp32_groups, optimizer.fp16_groups):
            for master, p in zip(masters, group):
                master.data.copy_(fp32_weights[id(p)])
        return
    pairs = fp32_weights if not isinstance(fp32_weights, dict) else (
        (p, fp32_weights[id(p)]) for p in engine.module.parameters() if id(p) in fp32_weights)
    for p, value in pairs:
        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            safe_set_full_fp32_param(p, value)


# ---- resuming at another data-parallel size (universal checkpoints) -----------------------
UNIVERSAL_TAG = "deepspeed_universal"


def checkpoint_world_size(ckpt: Path) -> int | None:
    """The world size of the run that wrote the checkpoint (trainer_state.json), if recorded."""
    state = Path(ckpt) / "trainer_state.json"
    return json.loads(state.read_text()).get("world_size") if state.is_file() else None


def to_universal(ckpt: Path) -> Path:
    """DeepSpeed's ds_to_universal: <ckpt>/deepspeed -> <ckpt>/deepspeed_universal, once. Written to a
    private temp folder and renamed, so a crash or a concurrent converter never leaves half a folder."""
    import argparse
    import io
    import shutil
    from deepspeed.checkpoint import ds_to_universal
    final = Path(ckpt) / UNIVERSAL_TAG
    if final.is_dir():
        return final
    tmp = Path(ckpt) / f"{UNIVERSAL_TAG}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    # inject_missing_state: only Megatron-style clients record universal_checkpoint_info themselves.
    # One worker each: no process pool inside a training rank.
    args = argparse.Namespace(input_folder=str(Path(ckpt) / "deepspeed"), output_folder=str(tmp),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                              strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()):  # its progress prints, one per parameter
        ds_to_universal.main(args)
    (Path(ckpt) / "latest_universal").unlink(missing_ok=True)  # it names the temp folder; we pass the tag
    try:
        tmp.rename(final)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def repair_zero3_universal_load(optimizer: torch.optim.Optimizer, universal_dir: Path) -> None:
    """Two slips of DeepSpeed 0.19.8's ZeRO-3 universal load (stage3.load_hp_checkpoint_state_from_
    checkpoint_dir_stage3), each of which changes the losses after resume:
    - it copies the hyper-parameters of param group 0 onto every group, so the no-decay group (biases,
      norms) would be decayed: each group gets its own saved values back;
    - it gives every sub-group the *same* `step` tensor, which foreach AdamW increments in place once
      per sub-group, so bias correction runs ahead: each state gets its own copy."""
    saved = load_deepspeed_file(Path(universal_dir) / "zero" / "optimizer_state.pt")["param_groups"]
    if len(saved) != len(optimizer.param_groups):
        raise RuntimeError(f"{universal_dir}: {len(saved)} optimizer param groups saved, {len(optimizer.param_groups)} now")
    for group, saved_group in zip(optimizer.param_groups, saved):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


@contextlib.contextmanager
def loading_universal(engine):
    """The engine reads `load_universal_checkpoint` only inside load_checkpoint (nothing at initialize
    depends on it), so it is switched on for this one load and restored after."""
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = before
