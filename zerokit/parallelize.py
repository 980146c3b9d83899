"""Tensor parallelism, Megatron-style, through PyTorch DTensor: how a model's modules split across the
ranks of a tensor-parallel group. The model code is untouched (torchtitan keeps the model, how it is
parallelised and the loop apart; so do we): the backends call `apply_tensor_parallel` on the built model,
then shard what remains over the data-parallel ranks (FSDP2 on the other dimension of a 2-D mesh).

In each decoder block the query/key/value and gate/up projections are column-parallel (each rank holds
heads/tp heads and intermediate/tp features, so attention and the activation run locally) and the output
and down projections row-parallel (one all-reduce each); the embedding is vocabulary-parallel (each rank
holds vocab/tp rows) and the LM head column-parallel with its logits gathered, so the loss is the
model's own. Everything else (the norms) is replicated: every rank computes the same, and its gradient
is already whole; with `sequence_parallel` the norms work on 1/tp of the sequence instead (Megatron
sequence parallelism, within each block). Ranks of one tensor-parallel group see the same micro-batches.
"""
from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleInputOutput,
                                               RowwiseParallel, SequenceParallel, parallelize_module)

from zerokit.errors import UsageError

# Decoder-block linear layers of the Llama family (Llama, Mistral, Qwen2: the same module names).
BLOCK_PLAN = {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
              "self_attn.o_proj": "rowwise", "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise",
              "mlp.down_proj": "rowwise"}


def check_tensor_parallel(model: torch.nn.Module, tp: int) -> None:
    """One clear error for a model this split cannot serve."""
    cfg = model.config
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(_has(layer, name) for layer in layers for name in BLOCK_PLAN):
        raise UsageError(f"parallel.tensor={tp} splits Llama-family blocks (q/k/v/o_proj, gate/up/down_proj); "
                         f"{cfg.model_type} has other modules: use model.preset=llama-tiny (or another llama-* preset)")
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    for what, n in (("attention heads", cfg.num_attention_heads), ("key/value heads", kv_heads),
                    ("MLP features (intermediate_size)", cfg.intermediate_size), ("vocabulary entries", cfg.vocab_size)):
        if n % tp:
            raise UsageError(f"parallel.tensor={tp} must divide the model's {what} ({n}); choose a tensor-parallel "
                             f"size that divides it" + (" (or set data.vocab_size to a multiple)" if "vocab" in what else ""))


def split_for_tensor_parallel(model: torch.nn.Module, info, sequence_parallel: bool = False) -> DeviceMesh | None:
    """With `info.tensor_parallel` > 1: split `model` (already on its device) over each group of consecutive
    ranks and return the data-parallel mesh across the groups (a (dp, tp) mesh's outer dimension). None
    without tensor parallelism."""
    tp = info.tensor_parallel
    if tp == 1:
        if sequence_parallel:
            raise UsageError("parallel.megatron_sp=true splits the sequence within tensor-parallel groups; "
                             "set parallel.tensor > 1 as well (or megatron_sp=false)")
        return None
    check_tensor_parallel(model, tp)
    mesh = init_device_mesh(info.device.type, (info.dp_size, tp), mesh_dim_names=("dp", "tp"))
    apply_tensor_parallel(model, mesh["tp"], sequence_parallel)
    return mesh["dp"]


def apply_tensor_parallel(model: torch.nn.Module, mesh: DeviceMesh, sequence_parallel: bool = False) -> torch.nn.Module:
    """Split `model` in place over the 1-D tensor-parallel `mesh` (all its ranks hold the same weights)."""
    for layer in model.model.layers:
        if sequence_parallel:
            parallelize_module(layer, mesh, _sequence_split_block())
            parallelize_module(layer, mesh, _sequence_parallel_block())
        else:
            parallelize_module(layer, mesh, {name: ColwiseParallel() if kind == "colwise" else RowwiseParallel()
                                             for name, kind in BLOCK_PLAN.items()})
    embedding, head = model.model.embed_tokens, model.get_output_embeddings()
    tied = head.weight is embedding.weight
    parallelize_module(embedding, mesh, RowwiseParallel(input_layouts=Replicate()))
    parallelize_module(head, mesh, ColwiseParallel(output_layouts=Replicate()))
    if tied:
        # The style gave the head a parameter of its own; both are (vocab, hidden) sharded on the vocabulary
        # rows, so the head takes the embedding's back: one weight, one gradient, one update.
        head.weight = embedding.weight
    # What no plan covers (the norms): the same weights on every rank, as DTensors, so that gradient
    # clipping and FSDP see one kind of parameter.
    for module in model.modules():
        if any(not isinstance(p, DTensor) for p in module.parameters(recurse=False)):
            distribute_module(module, mesh, input_fn=_replicated_inputs, output_fn=_local_outputs)
    return model


def _sequence_split_block() -> PrepareModuleInputOutput:
    """A block's whole input split along the sequence (a local slice, no communication), its output gathered."""
    return PrepareModuleInputOutput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                    use_local_input=False, output_layouts=(Shard(1),),
                                    desired_output_layouts=(Replicate(),), use_local_output=True)


def _sequence_parallel_block() -> dict:
    """Megatron sequence parallelism inside a block: the norms and residual adds work on 1/T of the sequence,
    and each all-reduce becomes an all-gather before the projections and a reduce-scatter after them.
    The block's input and output stay whole: transformers' model code outside the blocks derives the
    positions and the causal mask from the hidden states' shape, so the stream between blocks is
    gathered (one all-gather per block more than Megatron, whose own model code is sequence-aware)."""
    seq, whole = Shard(1), Replicate()
    plan = {"input_layernorm": SequenceParallel(), "post_attention_layernorm": SequenceParallel(),
            "self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": seq},
                                            desired_input_kwarg_layouts={"hidden_states": whole}),
            "mlp": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(whole,))}
    for name, kind in BLOCK_PLAN.items():
        # Row-parallel outputs stay DTensors: the residual they are added to is one.
        plan[name] = ColwiseParallel() if kind == "colwise" else RowwiseParallel(output_layouts=seq,
                                                                                 use_local_output=False)
    return plan


def _has(module: torch.nn.Module, dotted: str) -> bool:
    try:
        return isinstance(module.get_submodule(dotted), torch.nn.Linear)
    except AttributeError:
        return False


def _replicated_inputs(module, inputs, mesh):
    return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False) if torch.is_tensor(x)
                 and not isinstance(x, DTensor) else x for x in inputs)


def _local_outputs(module, outputs, mesh):
    return outputs.to_local() if isinstance(outputs, DTensor) else outputs
