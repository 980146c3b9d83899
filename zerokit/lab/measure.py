"""Measuring the memory of real training steps.

Live tensors (`LiveBytes`, `measure_step_peak`): a TorchDispatchMode sees every op's outputs and
counts the bytes of live tensor storages (a storage counts once however many views share it,
until it is freed); the peak is taken over one steady-state step.

What an engine holds (`walk_tensors`, `held_by_role`, `engine_storages`): every tensor reachable
from a DeepSpeed engine's module and ZeRO optimizer (flat buffers, fp32 partitions, gradient
partitions, buckets, Adam state), each storage once, under one role: weights, gradients, fp32
master, Adam moments, or buffers.
"""
from __future__ import annotations

import gc
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROLES = ("weights", "gradients", "master", "moments")


class LiveBytes(TorchDispatchMode):
    """Counts live tensor-storage bytes, the peak, and (optionally) a log per category.

    A storage is added when an op first returns it and removed when its C++ storage dies
    (storages keep their Python object while alive, so a weakref finalizer fires exactly
    then). Tensors made before the mode was entered count only if passed to `track`.
    Kernel-internal scratch that never leaves an op is not seen. Each storage carries a
    category (`self.cat` when it appeared; `retag` moves it, e.g. into "grad").
    """

    def __init__(self, log: bool = False):
        super().__init__()
        self.live: dict[int, list] = {}  # storage address -> [bytes, category, tag]
        self.by_cat: dict[str, int] = {}
        self.by_tag: dict[str, int] = {}
        self.current = self.peak = 0
        self.cat, self.tag = "act", "other"
        self.phase = self.peak_phase = "setup"
        self.phase_peaks: dict[str, int] = {}
        self.marks: dict[str, int] = {}  # live bytes as each phase began
        self.log = [] if log else None   # (phase, saved, logits, temp, grad) at each allocation

    def track(self, t: torch.Tensor, cat: str | None = None) -> None:
        st = t.untyped_storage()
        key = st._cdata  # the StorageImpl address, shared by every view
        if key in self.live:
            return
        n, cat = st.nbytes(), cat or self.cat
        tag = self.tag if cat == "saved" else cat  # sub-module tags only for what forward saves
        self.live[key] = [n, cat, tag]
        self.by_cat[cat] = self.by_cat.get(cat, 0) + n
        self.by_tag[tag] = self.by_tag.get(tag, 0) + n
        self.current += n
        weakref.finalize(st, self._free, key)
        self._changed()

    def retag(self, t: torch.Tensor, cat: str) -> None:
        entry = self.live.get(t.untyped_storage()._cdata)
        if entry and entry[1] != cat:
            self.by_cat[entry[1]] -= entry[0]
            self.by_cat[cat] = self.by_cat.get(cat, 0) + entry[0]
            entry[1] = cat
            self._changed()

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry:
            self.current -= entry[0]
            self.by_cat[entry[1]] -= entry[0]
            self.by_tag[entry[2]] -= entry[0]

    def _changed(self) -> None:
        if self.current > self.peak:
            self.peak, self.peak_phase = self.current, self.phase
        if self.current > self.phase_peaks.get(self.phase, -1):
            self.phase_peaks[self.phase] = self.current
        if self.log is not None:
            c = self.by_cat
            self.log.append((self.phase, c.get("saved", 0), c.get("logits", 0), c.get("temp", 0), c.get("grad", 0)))

    def set_phase(self, name: str, cat: str | None = None) -> None:
        self.phase = name
        self.cat = cat or self.cat
        self.phase_peaks.setdefault(name, self.current)
        self.marks.setdefault(name, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


def storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st._cdata] = st.nbytes()
    return sum(seen.values())


def optimizer_tensors(optimizer, with_params: bool = False):
    """State tensors of a torch optimizer, or of the ones a wrapper (DeepSpeed engine/ZeRO) holds
    in `.optimizer`; with_params adds the tensors it updates (ZeRO's fp32 master partitions)."""
    out = []
    for _ in range(4):  # engine -> ZeRO optimizer -> torch optimizer
        if optimizer is None:
            break
        state = getattr(optimizer, "state", None)
        if isinstance(state, dict):
            out += [t for s in state.values() if isinstance(s, dict) for t in s.values() if isinstance(t, torch.Tensor)]
        if with_params:
            out += [p for g in getattr(optimizer, "param_groups", []) for p in g.get("params", [])
                    if isinstance(p, torch.Tensor)]
        optimizer = getattr(optimizer, "optimizer", None)
    return out


def train_step(model, batch, optimizer, counter=None, backward=None, step=None):
    phase = counter.set_phase if counter else (lambda name: None)
    phase("forward")
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    loss = out.loss if hasattr(out, "loss") else out
    del out  # a training loop keeps only the loss: the logits die here unless autograd saved them
    phase("backward")
    (backward or (lambda loss: loss.backward()))(loss)
    grads = storage_bytes(p.grad for p in model.parameters() if p.grad is not None)
    phase("optimizer")
    if step is None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        step()
    return grads


def measure_step_peak(model, batch, optimizer, *, warmup: bool = True, backward=None, step=None) -> dict:
    """Peak bytes of live tensors during one steady-state training step.

    `batch`: a dict for `model(**batch)` (the output needs `.loss`), or one tensor for a
    model that returns the loss. With `warmup`, one unmeasured step runs first so the
    optimizer state exists (a first step differs: Adam allocates its state in it).
    `backward(loss)` and `step()` replace `loss.backward()` and `optimizer.step(); zero_grad()`,
    e.g. `backward=engine.backward, step=engine.step` for a DeepSpeed engine.
    Returns bytes: the peak and its phase, the baseline (weights + optimizer state + batch),
    each phase's peak, what forward left alive for backward, the grads; on CUDA also the
    allocator's own peak (`cuda_peak_allocated_bytes`), which sees ZeRO's flat buffers that
    `model.parameters()` and `optimizer.state` do not expose.
    """
    if warmup:
        train_step(model, batch, optimizer, backward=backward, step=step)
    gc.collect()
    counter = LiveBytes()
    params = list(model.parameters())
    batch_tensors = list(batch.values()) if isinstance(batch, dict) else [batch]
    for t in params + list(model.buffers()) + optimizer_tensors(optimizer, with_params=True) + batch_tensors:
        counter.track(t)
    baseline = counter.current
    on_cuda = torch.cuda.is_available() and any(t.is_cuda for t in params)
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with counter:
        grads = train_step(model, batch, optimizer, counter, backward, step)
    result = {
        "peak_bytes": counter.peak,
        "peak_phase": counter.peak_phase,
        "baseline_bytes": baseline,
        "params_bytes": storage_bytes(params),
        "optimizer_state_bytes": storage_bytes(optimizer_tensors(optimizer)),
        "grads_bytes": grads,
        "after_forward_bytes": counter.marks["backward"] - baseline,
        "phase_peaks": dict(counter.phase_peaks),
    }
    if on_cuda:
        torch.cuda.synchronize()
        result["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return result


# ---- what a DeepSpeed engine holds -------------------------------------------------------
def walk_tensors(obj, path: str, out: list, seen: set, depth: int = 0) -> None:
    """Every tensor reachable from `obj` through lists, dicts and DeepSpeed objects, with its path."""
    if depth > 8 or id(obj) in seen:
        return
    if torch.is_tensor(obj):  # not marked seen: a tensor reached by several paths is listed under each
        out.append((path, obj))
        if getattr(obj, "grad", None) is not None:
            out.append((path + ".grad", obj.grad))
        if torch.is_tensor(getattr(obj, "ds_tensor", None)):  # ZeRO-3: this rank's partition
            out.append((path + ".ds_tensor", obj.ds_tensor))
        return
    if isinstance(obj, (list, tuple)):
        seen.add(id(obj))
        for i, v in enumerate(obj):
            walk_tensors(v, f"{path}[{i}]", out, seen, depth + 1)
    elif isinstance(obj, dict):
        seen.add(id(obj))
        for i, (k, v) in enumerate(obj.items()):
            walk_tensors(v, f"{path}[{k if isinstance(k, (str, int)) else i}]", out, seen, depth + 1)
    elif isinstance(obj, torch.optim.Optimizer) or type(obj).__module__.startswith("deepspeed"):
        seen.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            return  # the module's parameters are walked on their own
        for k, v in vars(obj).items():
            walk_tensors(v, f"{path}.{k}", out, seen, depth + 1)


# Role of a storage, from the paths that reach it (first rule that matches any path wins).
_RULES = (
    ("gradients", (".grad", "averaged_gradients", "all_grad_tensors", "grads_in_partition", "accumulated_grads_in_cpu",
                   "grad_partitions_flat_buffer", "param_id_to_grad_partition")),
    ("moments", (".state[",)),
    ("master", ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")),
    ("weights", ("param:", "bit16_groups", "fp16_groups", "fp16_partitioned_groups", "ds_tensor")),
)


def role_of(paths: list[str]) -> str:
    for role, needles in _RULES:
        if any(n in p for p in paths for n in needles):
            return role
    return "buffers"


def held_by_role(backend) -> dict:
    """Bytes per role held by this rank's engine, storages deduplicated."""
    found: list = []
    seen: set = set()
    for name, p in backend.module.named_parameters():
        walk_tensors(p, f"param:{name}", found, seen)
    walk_tensors(backend.engine.optimizer, "opt", found, seen)
    storages: dict = {}
    for path, t in found:
        s = t.untyped_storage()
        if s.nbytes() == 0 or t.device.type == "meta":  # released ZeRO-3 storages; shape-only tensors
            continue
        entry = storages.setdefault((t.device.type, s.data_ptr()), {"bytes": s.nbytes(), "paths": [],
                                                                     "device": t.device.type})
        entry["paths"].append(path)
    held = {r: 0 for r in (*ROLES, "buffers")}
    held["by_device"] = {}
    for entry in storages.values():
        held[role_of(entry["paths"])] += entry["bytes"]
        held["by_device"][entry["device"]] = held["by_device"].get(entry["device"], 0) + entry["bytes"]
    # every storage, largest first: what was counted, under which role, reached how
    held["storages"] = sorted(((e["bytes"], role_of(e["paths"]), e["paths"][:3]) for e in storages.values()),
                              reverse=True)
    return held


def engine_storages(backend) -> list[torch.Tensor]:
    """One tensor per storage the engine holds (module params, ZeRO partitions, optimizer state)."""
    found, seen = [], set()
    for name, p in backend.module.named_parameters():
        walk_tensors(p, name, found, seen)
    walk_tensors(backend.engine.optimizer, "opt", found, seen)
    return [t for _, t in found if t.device.type != "meta" and t.untyped_storage().nbytes() > 0]
