"""Pipeline parallelism: a Llama-family causal LM cut into `parallel.pipeline` stages of consecutive
decoder layers (the embedding on the first, the final norm and LM head on the last), run by
`torch.distributed.pipelining` (PipelineStage with a GPipe or 1F1B schedule) over the micro-batches of
an accumulation window. zerokit/backends/pipeline.py drives it; the model code is not touched.

Each rank builds the whole model (the same seed, so the same weights) and keeps only its stage's
modules, under their Hugging Face names (`model.layers.3.mlp...`): a checkpoint's shards together are
the whole model's state dict, so `zerokit export` needs nothing special. A stage recomputes the
rotary position embeddings (a buffer, no weights) and the causal mask from its input's shape and passes
them into its decoder layers, as LlamaModel.forward does for all of them.

Ranks: a (pipeline, data) mesh with the pipeline outermost (torchtitan's order): rank = stage * dp + d.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from zerokit.errors import UsageError

SCHEDULES = ("gpipe", "1f1b")


def balanced_split(costs: list[int], parts: int) -> list[int]:
    """Cut points 0 = b_0 < b_1 < ... < b_parts = len(costs) of `costs` into `parts` non-empty runs of
    consecutive items whose largest sum is smallest (exact, by dynamic programming over the cuts)."""
    n = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: the smallest largest sum splitting the first i items into k runs; cut[k][i]: its last cut
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                worst = max(best[k - 1][j], prefix[i] - prefix[j])
                if worst < best[k][i]:
                    best[k][i], cut[k][i] = worst, j
    bounds, i = [n], n
    for k in range(parts, 0, -1):
        i = cut[k][i]
        bounds.append(i)
    return bounds[::-1]


def stage_layers(model: nn.Module, pp: int) -> list[range]:
    """The decoder layers of each stage, balanced by parameter count (the embedding counts towards the
    first stage, the final norm and head towards the last)."""
    def numel(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())
    costs = [numel(layer) for layer in model.model.layers]
    costs[0] += numel(model.model.embed_tokens)
    costs[-1] += numel(model.model.norm) + numel(model.lm_head)
    bounds = balanced_split(costs, pp)
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def check_pipeline(model: nn.Module, pp: int, schedule: str, grad_accum: int) -> None:
    """One clear error for a model or setting this split cannot serve."""
    cfg = model.config
    inner = getattr(model, "model", None)
    if not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")) \
            or not hasattr(model, "lm_head"):
        raise UsageError(f"parallel.pipeline={pp} splits Llama-family models (embed_tokens, layers, norm, lm_head); "
                         f"{cfg.model_type} is laid out otherwise: use model.preset=llama-tiny (or another llama-* preset)")
    if getattr(cfg, "output_router_logits", False) or getattr(cfg, "num_local_experts", 0) or \
            getattr(cfg, "num_experts", 0):
        raise UsageError(f"parallel.pipeline={pp} does not carry a mixture of experts' router loss between stages; "
                         f"use a dense llama-* preset or parallel.pipeline=1")
    if cfg.num_hidden_layers < pp:
        raise UsageError(f"parallel.pipeline={pp} needs at least one decoder layer per stage; the model has "
                         f"{cfg.num_hidden_layers}: choose parallel.pipeline <= {cfg.num_hidden_layers}")
    if schedule not in SCHEDULES:
        raise UsageError(f"parallel.pipeline_schedule={schedule} is not one of {', '.join(SCHEDULES)}; "
                         f"set parallel.pipeline_schedule=1f1b")
    if schedule == "1f1b" and grad_accum < pp:
        raise UsageError(f"parallel.pipeline_schedule=1f1b needs at least as many micro-batches as stages: "
                         f"train.grad_accum={grad_accum} < parallel.pipeline={pp}; raise train.grad_accum to {pp} "
                         f"or more (or use parallel.pipeline_schedule=gpipe)")


def is_tied(model: nn.Module) -> bool:
    """The LM head is the embedding (llama-demo, llama-1b): the first and the last stage each hold a copy."""
    return model.get_output_embeddings().weight is model.model.embed_tokens.weight


def first_last_group(pp: int, dp: int, rank: int) -> dist.ProcessGroup | None:
    """The first and the last stage of this rank's replica, which sum their tied copies' gradients (None on
    the stages between). Every rank creates every pair: new_group is collective."""
    mine = None
    for d in range(dp):
        pair = [d, (pp - 1) * dp + d]
        group = dist.new_group(pair)
        if rank in pair:
            mine = group
    return mine


class Stage(nn.Module):
    """Stage `index` of `num_stages`: the full model's modules it runs, under their full-model names."""

    def __init__(self, model: nn.Module, layers: range, index: int, num_stages: int):
        super().__init__()
        self.config = model.config
        self.is_first, self.is_last = index == 0, index == num_stages - 1
        self.model = nn.Module()
        if self.is_first:
            self.model.embed_tokens = model.model.embed_tokens
        self.model.layers = nn.ModuleDict({str(i): model.model.layers[i] for i in layers})
        self.model.rotary_emb = model.model.rotary_emb
        if self.is_last:
            self.model.norm, self.lm_head = model.model.norm, model.lm_head
        self.tied = is_tied(model)

    @property
    def tied_copy(self) -> nn.Parameter | None:
        """A tied model's embedding (first stage) or head (last stage): one weight, a copy on each. Looked up
        when asked: FSDP replaces the parameters."""
        if not self.tied:
            return None
        return self.model.embed_tokens.weight if self.is_first else self.lm_head.weight if self.is_last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (first stage) or hidden states in; hidden states or logits (last stage) out."""
        from transformers.masking_utils import create_causal_mask
        hidden = self.model.embed_tokens(x) if self.is_first else x
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=None, cache=None,
                                  position_ids=positions)
        rotary = self.model.rotary_emb(hidden, position_ids=positions)
        for layer in self.model.layers.values():
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions)
        return self.lm_head(self.model.norm(hidden)) if self.is_last else hidden


class PipelinedLM(nn.Module):
    """What the loop, evaluation and sampling see as the model: this rank's stage, and a forward pass that
    runs the whole pipeline (activations sent stage to stage, the last stage's logits broadcast to every
    stage), so that each rank of a pipeline holds the same logits. Forward only: training runs the
    schedule (zerokit/backends/pipeline.py)."""

    def __init__(self, stage: Stage, group: dist.ProcessGroup):
        super().__init__()
        self.stage, self.config, self.group = stage, stage.config, group
        self.ranks = dist.get_process_group_ranks(group)  # global ranks, by stage
        self.index = self.ranks.index(dist.get_rank())

    def get_output_embeddings(self):
        return self.stage.lm_head if self.stage.is_last else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, use_cache: bool = False):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise UsageError("parallel.pipeline > 1 runs unpadded blocks only (pre-training); drop the padding")
        batch, length = input_ids.shape
        dtype = next(self.stage.parameters()).dtype
        if self.stage.is_first:
            x = input_ids
        else:
            x = torch.empty(batch, length, self.config.hidden_size, dtype=dtype, device=input_ids.device)
            dist.recv(x, self.ranks[self.index - 1], group=self.group)
        out = self.stage(x)
        if not self.stage.is_last:
            dist.send(out.to(dtype).contiguous(), self.ranks[self.index + 1], group=self.group)
            out = torch.empty(batch, length, self.config.vocab_size, dtype=dtype, device=input_ids.device)
        logits = out.to(dtype).contiguous()
        dist.broadcast(logits, self.ranks[-1], group=self.group)
        return SimpleNamespace(logits=logits)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                 do_sample: bool = True, **_) -> torch.Tensor:
        """Top-k sampling without a KV cache (a full pipeline forward per token): every rank draws the same
        tokens, from the same logits and the same seeded generator state (zerokit.pretraining.sample_text)."""
        ids = input_ids
        for _ in range(max_new_tokens):
            logits = self(ids).logits[:, -1].float()
            if not do_sample:
                ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
                continue
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            ids = torch.cat([ids, torch.multinomial(F.softmax(logits, dim=-1), 1)], dim=1)
        return ids


def build_schedule(stage_module: nn.Module, group: dist.ProcessGroup, device: torch.device,
                   kind: str, micro_batches: int, loss_fn):
    """The torch.distributed.pipelining schedule of this rank's stage `stage_module` (a Stage, or an FSDP2 one).
    Gradients are not rescaled: `loss_fn` already normalises by the window's targets."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    ranks = dist.get_process_group_ranks(group)
    pipe_stage = PipelineStage(stage_module, ranks.index(dist.get_rank()), len(ranks), device, group=group)
    cls = ScheduleGPipe if kind == "gpipe" else Schedule1F1B
    return cls(pipe_stage, n_microbatches=micro_batches, loss_fn=loss_fn, scale_grads=False)
