"""New weights as a function of (seed, module name), and models whose ranks never hold the whole of them.

A from-scratch model is initialised by Hugging Face's own `_init_weights`, module by module in its order
(children before parents, as `PreTrainedModel.initialize_weights` does), each module under a generator
seeded from (train.seed, the module's name). So a module's values depend on nothing else: not on which
modules were built before it, not on whether the rest of the model exists on this rank. Every engine
uses this one function, which is what lets a sharded start be checked against one plain process
exactly (tests/test_meta_init.py):

  full    every rank builds the whole fp32 model (plain/DDP, ZeRO 0-2, model.sharded_init=false)
  meta    FSDP2: parameters on the meta device; the backend then materialises one FSDP unit (a
          transformer block, last the embeddings/norm/head) at a time on the CPU, initialises it whole
          and shards it at once (`fully_shard` keeps only this rank's slice): peak = shard + one unit
  zero3   DeepSpeed ZeRO-3: built under `deepspeed.zero.Init` (each module partitioned as it is
          constructed), then each module gathered in turn, initialised on rank 0 and re-partitioned

torchtitan builds on meta too but initialises the sharded DTensors in place, whose values then depend on
the sharding (exact only from a seed checkpoint); initialising each unit whole keeps them independent of it.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import weakref
from typing import Callable, Iterator

import torch
from torch import nn

# FSDP2-bound models built on meta -> the seed their units are initialised with (see materialize).
_PENDING: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()
# Models built under a 16-bit zero.Init -> their seed: DeepSpeed's fp32 masters are set from it (fp32_inits).
_ZERO3_16BIT: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()


def module_seed(seed: int, name: str) -> int:
    """The generator seed of the module called `name` (stable across processes, unlike hash())."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def init_order(model: nn.Module) -> Iterator[tuple[str, nn.Module, Callable]]:
    """(name, module, its _init_weights) children first, each submodel with its own _init_weights, as
    transformers' `initialize_weights` (smart_apply) visits them."""
    from transformers import PreTrainedModel

    def visit(module, prefix, init_fn):
        for name, child in module.named_children():
            fn = child._init_weights if isinstance(child, PreTrainedModel) else init_fn
            yield from visit(child, f"{prefix}{name}.", fn)
        yield prefix[:-1], module, init_fn
    yield from visit(model, "", model._init_weights)


def _touched(module: nn.Module) -> list[nn.Parameter]:
    """What a module's _init_weights may write: its own parameters and its direct children's (GPT-2's
    attention rescales its c_proj; transformers' ZeRO-3 init gathers the same set)."""
    from transformers import PreTrainedModel
    params = list(module.parameters(recurse=False))
    for child in module.children():
        if not isinstance(child, PreTrainedModel):
            params += list(child.parameters(recurse=False))
    return params


def _owned(model: nn.Module) -> dict[int, str]:
    """Parameter -> its first name: a tied weight (GPT-2's lm_head = wte) belongs to where it is first named."""
    return {id(p): name for name, p in model.named_parameters()}


def _initialise(name: str, module: nn.Module, init_fn: Callable, seed: int, owned: dict[int, str]) -> None:
    """One module's _init_weights under its own generator, on the CPU in fp32 (the same values on every
    device and engine). Its own parameters start as NaN: one left so was not initialised."""
    own = [(pname, p) for pname, p in module.named_parameters(recurse=False)
           if owned.get(id(p)) == (f"{name}.{pname}" if name else pname)]
    if not own and list(module.parameters(recurse=False)):
        return  # only tied weights, initialised where they are owned (as transformers ties after init)
    touched = _touched(module)
    if not touched:
        return  # nothing to write (rotary tables are buffers, computed at construction)
    # Computed in fp32 on the CPU; a copy only of weights that live elsewhere (a GPU) or in 16 bits.
    moved = {id(p): p.data for p in touched if p.device.type != "cpu" or p.dtype != torch.float32}
    for p in touched:
        if id(p) in moved:
            p.data = moved[id(p)].to("cpu", torch.float32)
    for _, p in own:
        p.data.fill_(float("nan"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(module_seed(seed, name))
        init_fn(module)
    bad = [f"{name}.{pname}" for pname, p in own if torch.isnan(p.data).any()]
    if bad:
        owner = type(getattr(init_fn, "__self__", init_fn)).__name__
        raise RuntimeError(f"{owner}._init_weights leaves {', '.join(bad)} uninitialised; "
                           "zerokit.sharded_init cannot build this model from scratch")
    for p in touched:
        if id(p) in moved:
            moved[id(p)].copy_(p.data)
            p.data = moved[id(p)]


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, modules: set[int] | None = None) -> None:
    """Initialise every module of `model` (or those whose id() is in `modules`) from (seed, its name)."""
    owned = _owned(model)
    for name, module, init_fn in init_order(model):
        if modules is None or id(module) in modules:
            _initialise(name, module, init_fn, seed, owned)


def construct(config, implementation: str, seed: int, mode: str = "full",
              zero_init: contextlib.AbstractContextManager | None = None) -> nn.Module:
    """A from-scratch causal LM of `config`: mode full, meta (FSDP2 materialises it: materialize) or zero3
    (under `zero_init`, a deepspeed.zero.Init); see the module docstring."""
    from accelerate import init_empty_weights
    where = {"full": contextlib.nullcontext(), "meta": init_empty_weights(include_buffers=False),
             "zero3": zero_init}[mode]
    model = _uninitialised(config, implementation, where)
    if mode == "full":
        if not any(p.is_meta for p in model.parameters()):  # built under torch.device("meta") (the lab's probe): no values
            init_weights(model, seed)
    elif mode == "meta":
        _PENDING[model] = seed
    else:
        zero3_init_weights(model, seed)
        if any(p.dtype != torch.float32 for p in model.parameters()):
            _ZERO3_16BIT[model] = seed
            _fp32_buffers(model, config, implementation)
    return model


def _uninitialised(config, implementation: str, where: contextlib.AbstractContextManager) -> nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    with no_init_weights(), where:  # no_init_weights: construction draws nothing; our init sets every value
        model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation, dtype=torch.float32)
    model.tie_weights()  # no_init_weights also skipped the tying that init_weights does
    return model


def _fp32_buffers(model: nn.Module, config, implementation: str) -> None:
    """A 16-bit zero.Init creates every floating tensor in its dtype, buffers too (Llama's rotary inv_freq:
    4e-3 relative off, 2e-5 on the first loss), where a whole build keeps them in fp32 (DeepSpeed casts only
    parameters). Take them from a build on meta, whose buffers are real and fp32 (parameters cost nothing)."""
    from accelerate import init_empty_weights
    reference = dict(_uninitialised(config, implementation, init_empty_weights(include_buffers=False)).named_buffers())
    for prefix, module in model.named_modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.is_floating_point():
                module._buffers[name] = reference[f"{prefix}.{name}" if prefix else name].to(buffer.device)


@torch.no_grad()
def zero3_init_weights(model: nn.Module, seed: int) -> None:
    """Each module's partitioned parameters gathered, initialised on rank 0, re-partitioned (the
    transformers ZeRO-3 scheme: initialize_weights_zero3), with our per-module seeds."""
    import deepspeed
    owned, rank = _owned(model), torch.distributed.get_rank()
    for name, module, init_fn in init_order(model):
        touched = _touched(module)
        if not touched:
            continue
        with deepspeed.zero.GatheredParameters(touched, modifier_rank=0):
            if rank == 0:
                _initialise(name, module, init_fn, seed, owned)
        release_freed_memory()  # the module gathered whole, before the next one


@torch.no_grad()
def fp32_inits(model: nn.Module) -> Iterator[tuple[nn.Parameter, torch.Tensor]] | None:
    """For a model built under a bf16/fp16 zero.Init: each parameter with its whole fp32 initial value, the
    one a whole-model build has (its 16-bit partitions hold that value rounded). Computed on every rank
    from (seed, name), module by module, with no communication: a module's ZeRO-3 placeholders are given
    fp32 storage of their full shape (ds_shape) for its init and put back after. A parameter is yielded
    once the last module that writes it (GPT-2's c_proj: also its parent) is done, then dropped, so a rank
    holds about one module whole. None for any other model."""
    if model not in _ZERO3_16BIT:
        return None
    seed, owned = _ZERO3_16BIT.pop(model), _owned(model)
    order = [(name, module, fn, _touched(module)) for name, module, fn in init_order(model)]
    last = {id(p): i for i, (*_, touched) in enumerate(order) for p in touched}

    def values():
        fp32: dict[int, torch.Tensor] = {}
        for i, (name, module, init_fn, touched) in enumerate(order):
            placeholders = [p.data for p in touched]
            for p in touched:
                p.data = fp32[id(p)] if id(p) in fp32 else torch.empty(tuple(p.ds_shape), dtype=torch.float32)
            try:
                _initialise(name, module, init_fn, seed, owned)
                fp32.update((id(p), p.data) for p in touched)
            finally:
                for p, data in zip(touched, placeholders):
                    p.data = data
            for p in touched:
                if last[id(p)] == i and id(p) in fp32:
                    yield p, fp32.pop(id(p))
    return values()


def release_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc's malloc_trim; elsewhere nothing). A unit's whole
    weights (1-30 MB tensors, under glibc's mmap threshold once it has adapted) are freed between the
    shards allocated after them, so glibc keeps them mapped: +250-450 MiB of resident memory per rank for
    llama-0.5b under FSDP2 without this (bench/init_memory.sh; MALLOC_MMAP_THRESHOLD_=65536 removed it too)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def partitioning_init(ds_config: dict):
    """deepspeed.zero.Init (for construct's zero3 mode) that also hands each module's freed whole weights
    back to the OS once the module is partitioned: glibc kept ~600 MiB of them resident on a rank building
    llama-0.5b without it."""
    import deepspeed

    class PartitionAndRelease(deepspeed.zero.Init):
        def _post_init_method(self, module):
            super()._post_init_method(module)
            release_freed_memory()
    return PartitionAndRelease(config_dict_or_path=ds_config)  # no dtype=: see backends.deepspeed.zero3_init


def pending(model: nn.Module) -> bool:
    """Whether `model` was built on meta and waits for its units to be materialised."""
    return model in _PENDING


@torch.no_grad()
def materialize(model: nn.Module, unit: nn.Module, device: torch.device, done: set[int]) -> None:
    """The meta parameters under `unit` given storage, initialised whole on the CPU, then moved to
    `device` (the rest of the model stays as it is). `done`: ids of modules already materialised, which
    this adds to (the root unit comes last and skips the blocks sharded before it)."""
    release_freed_memory()  # the unit before this one, whole, freed once it was sharded
    fresh: dict[int, nn.Parameter] = {}
    for module in unit.modules():
        if id(module) in done:
            continue
        for pname, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in fresh:  # a tied weight gets one tensor, shared as before
                    fresh[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
                setattr(module, pname, fresh[id(p)])
    todo = {id(m) for m in unit.modules()} - done
    init_weights(model, _PENDING[model], todo)
    done |= todo
    if device.type != "cpu":
        for p in fresh.values():
            p.data = p.data.to(device)
    if unit is model:
        del _PENDING[model]


def unit_materializer(model: nn.Module, device: torch.device | None) -> Callable[[nn.Module], None] | None:
    """For a model built on meta: materialize(unit) for each FSDP unit in turn, the root last (its weights
    stay on the CPU when `device` is None: offload). None for a model that already has its weights."""
    if not pending(model):
        return None
    done: set[int] = set()
    return lambda unit: materialize(model, unit, device or torch.device("cpu"), done)

