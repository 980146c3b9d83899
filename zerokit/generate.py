"""Text generation: a library function for the loop / evaluation, and `zerokit generate`.

`generate_text` is batched with left padding (decoder-only models continue from the right end
of every row). When several ranks generate under ZeRO-3 each forward gathers the partitioned
parameters collectively, so every rank must (a) make the same number of `generate` calls and
(b) keep stepping until all ranks are done: (a) is done here by agreeing on the largest batch
count and running throw-away batches, (b) by HF's `synced_gpus=True`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

from zerokit.data.batches import pad
from zerokit.detokenize import detokenize
from zerokit.errors import UsageError
from zerokit.models import eval_mode

STRATEGIES = ("greedy", "beam", "sample")


def _dist_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def generate_text(model, tokenizer, prompts: Sequence[str | Sequence[int]], strategy: str = "greedy",
                  max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0,
                  num_beams: int = 4, seed: int | None = None, batch_size: int = 8,
                  synced_gpus: bool | None = None, no_repeat_ngram_size: int = 0, repetition_penalty: float = 1.0,
                  length_penalty: float = 1.0, sources: Sequence[str] | None = None) -> list[str]:
    """Continuations (prompt not included) of `prompts`, text or token-id lists, one string each.

    synced_gpus=None turns it on when torch.distributed is initialised with more than one rank;
    then every rank of the group must call this function (the prompt lists may differ).
    `seed` seeds sampling without disturbing the caller's RNG state.
    no_repeat_ngram_size (0: off) and repetition_penalty (1: off) look at the generated tokens only, so a
    summary may copy the prompt's words; length_penalty is beam search's (>1 favours longer outputs).
    WordPiece output is spaced and cased after `sources` (one text per prompt; default: text prompts
    themselves), see zerokit/detokenize.py.
    """
    if strategy not in STRATEGIES:
        raise UsageError(f"unknown generation strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if max_new_tokens < 1 or batch_size < 1 or (strategy == "beam" and num_beams < 1):
        raise UsageError("max_new_tokens, batch_size and num_beams must be >= 1")
    if no_repeat_ngram_size < 0 or not repetition_penalty > 0:
        raise UsageError(f"no_repeat_ngram_size must be >= 0 and repetition_penalty > 0 (got {no_repeat_ngram_size}, {repetition_penalty})")
    if sources is not None and len(sources) != len(prompts):
        raise UsageError(f"{len(sources)} sources for {len(prompts)} prompts; give one source text per prompt")
    if strategy == "sample" and not (temperature > 0 and 0 < top_p <= 1 and top_k >= 0):
        raise UsageError(f"sampling needs temperature > 0, 0 < top_p <= 1, top_k >= 0 (got {temperature}, {top_p}, {top_k})")
    eos = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad_id is None:
        raise UsageError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    ids = [list(p) if not isinstance(p, str) else tokenizer(p)["input_ids"] for p in prompts]
    if sources is None:
        sources = [p if isinstance(p, str) else None for p in prompts]
    # A decoder-only model needs a token to continue from: bos, else eos (GPT-2 trains with eos as bos).
    start = next(t for t in (tokenizer.bos_token_id, eos, pad_id) if t is not None)
    ids = [p if p else [start] for p in ids]
    # A learned position table (GPT-2's, BERT's) ends at the context length: generating past it is an
    # index error deep in the model. Rotary models (Llama) have no table and may go on.
    cfg = model.config
    positions = getattr(cfg, "n_positions", None) or (
        cfg.max_position_embeddings if getattr(cfg, "position_embedding_type", None) == "absolute" else None)
    if positions and not encoder_decoder and max(map(len, ids)) + max_new_tokens > positions:
        raise UsageError(f"the prompt ({max(map(len, ids))} tokens) plus max_new_tokens={max_new_tokens} exceed the "
                         f"model's context of {positions} tokens; ask for at most {positions - max(map(len, ids))} new tokens")

    synced = _dist_world() > 1 if synced_gpus is None else bool(synced_gpus)
    device = next(model.parameters()).device
    n_batches = math.ceil(len(ids) / batch_size)
    if synced:
        t = torch.tensor([n_batches], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        n_batches = int(t.item())

    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos, synced_gpus=synced)
    if strategy == "greedy":
        kwargs.update(do_sample=False, num_beams=1)
    elif strategy == "beam":
        kwargs.update(do_sample=False, num_beams=num_beams, early_stopping=True, length_penalty=length_penalty)
    else:
        kwargs.update(do_sample=True, num_beams=1, temperature=temperature, top_k=top_k, top_p=top_p)

    side = "right" if encoder_decoder else "left"
    out: list[str] = []
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with eval_mode(model), torch.random.fork_rng(devices=fork_devices), fsdp_root_unsharded(model):
        if seed is not None:
            torch.manual_seed(seed)
        for b in range(n_batches):
            chunk = ids[b * batch_size:(b + 1) * batch_size]
            real = len(chunk)
            chunk = chunk or [ids[0] if ids else [pad_id]]  # throw-away batch for the collective
            input_ids = pad(chunk, pad_id, side).to(device)
            mask = pad([[1] * len(c) for c in chunk], 0, side).to(device)
            # A decoder-only output starts after the (left-padded) prompt, an encoder-decoder one after its start token.
            prompt_len = 1 if encoder_decoder else input_ids.size(1)
            seqs = model.generate(input_ids=input_ids, attention_mask=mask, **kwargs,
                                  logits_processor=repetition_processors(no_repeat_ngram_size, repetition_penalty, prompt_len))
            new = seqs if encoder_decoder else seqs[:, input_ids.size(1):]
            out += [detokenize(tokenizer, s.tolist(), src) for s, src in zip(new[:real], sources[b * batch_size:])]
    return out


class GeneratedNoRepeatNGram(NoRepeatNGramLogitsProcessor):
    """transformers' no-repeat-n-gram ban over the generated tokens only: its own processor also bans every
    n-gram of a decoder-only model's prompt, so a summary could not repeat a name the dialogue spells twice."""

    def __init__(self, ngram_size: int, prompt_len: int):
        super().__init__(ngram_size)
        self.prompt_len = prompt_len

    def __call__(self, input_ids, scores):
        return super().__call__(input_ids[:, self.prompt_len:], scores)


def repetition_processors(no_repeat_ngram_size: int, repetition_penalty: float, prompt_len: int) -> LogitsProcessorList:
    """The logits processors of both settings, looking at the tokens after the first `prompt_len` only."""
    procs = LogitsProcessorList()
    if repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(float(repetition_penalty), prompt_ignore_length=prompt_len))
    if no_repeat_ngram_size > 0:
        procs.append(GeneratedNoRepeatNGram(no_repeat_ngram_size, prompt_len))
    return procs


@contextlib.contextmanager
def fsdp_root_unsharded(model):
    """FSDP2 gathers a unit's parameters in a hook on that unit's forward. A PeftModel's generate()
    calls the inner model's forward, past the root unit's hook, so the root's own parameters
    (embeddings, head, final norm) would stay sharded; gather them for the whole generation
    (the blocks, units of their own, still gather per forward)."""
    from torch.distributed.fsdp import FSDPModule
    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


# ----------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zerokit generate", description="Generate text from an exported model (and LoRA adapter).",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  zerokit generate --model exported/gpt --prompt 'ROMEO:' --strategy sample "
                                       "--temperature 0.8 --max_new_tokens 100\n"
                                       "  zerokit generate --model exported/gpt --benchmark --batch_sizes 1,4,16 --out runs/genbench")
    p.add_argument("--model", required=True, help="exported Hugging Face model folder (or hub name)")
    p.add_argument("--adapter", help="LoRA adapter folder saved by zerokit (peft save_pretrained)")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for several prompts (--benchmark: optional)")
    p.add_argument("--strategy", choices=STRATEGIES, default="greedy")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=50)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--num_beams", type=int, default=4)
    p.add_argument("--no_repeat_ngram_size", type=int, default=0, help="never repeat a generated n-gram of this size (0: off)")
    p.add_argument("--repetition_penalty", type=float, default=1.0, help="divide repeated tokens' logits by this (1: off)")
    p.add_argument("--length_penalty", type=float, default=1.0, help="beam search: >1 favours longer outputs, <1 shorter")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--jsonl", action="store_true", help="print one JSON object per prompt instead of plain text")
    b = p.add_argument_group("--benchmark: prefill/decode tokens/s per KV-cache mode and batch size (greedy, eos ignored)")
    b.add_argument("--benchmark", action="store_true", help="measure instead of printing completions (zerokit/generate_bench.py)")
    b.add_argument("--batch_sizes", default="1,2,4,8", help="comma list of batch sizes")
    b.add_argument("--modes", default="dynamic,static,none,paged",
                   help="KV cache: dynamic, static (preallocated), none (recompute), paged (continuous batching)")
    b.add_argument("--prompt_tokens", type=int, default=32, help="random prompt length when no --prompt is given")
    b.add_argument("--out", default="runs/generate_benchmark", help="folder for benchmark.json and benchmark.csv")
    b.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, one per core)")
    return p


def load_for_generation(model_path: str, adapter: str | None = None, device: str | None = None):
    """(model, tokenizer) from an exported model folder, plus a LoRA adapter folder if given."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    mp = Path(model_path).expanduser()
    if not mp.exists() and str(model_path).startswith(("/", ".", "~")):
        raise UsageError(f"model folder not found: {model_path}; give the folder an export wrote (config.json + weights)")
    if mp.is_dir() and not (mp / "config.json").is_file():
        hint = " (it looks like a LoRA adapter: pass it as --adapter and its base as --model)" if (mp / "adapter_config.json").is_file() else ""
        raise UsageError(f"{mp} has no config.json{hint}; --model must be an exported model folder")
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise UsageError(f"{adapter} has no adapter_config.json; --adapter must be a folder written by save_adapter")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        config = AutoConfig.from_pretrained(model_path)
        cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        # fp32 on CPU (bf16 matmuls there are slow and lossy); the saved dtype on GPU.
        model = cls.from_pretrained(model_path, dtype=torch.float32 if device == "cpu" else "auto")
    except OSError as e:
        raise UsageError(f"cannot load model {model_path!r} ({' '.join(str(e).split())}); give an exported model folder") from None
    if adapter is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter)
    tok_dir = adapter if adapter is not None and _has_tokenizer(Path(adapter)) else model_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    except (OSError, ValueError) as e:
        raise UsageError(f"no tokenizer in {tok_dir} ({' '.join(str(e).split())}); save the tokenizer beside the model") from None
    return model.to(device), tokenizer


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()


def generate_main(argv: Sequence[str] | None = None) -> int:
    """`zerokit generate ...`; raises UsageError for user mistakes (the CLI prints it, exit 2)."""
    args = _parser().parse_args(argv)
    if not args.prompt and not args.benchmark:
        raise UsageError("give a prompt: --prompt TEXT (repeat it for several), or measure speed with --benchmark")
    if args.benchmark and args.strategy != "greedy":
        raise UsageError("--benchmark decodes greedily (every cache mode must give the same tokens); drop --strategy")
    model, tokenizer = load_for_generation(args.model, args.adapter, args.device)
    if args.benchmark:
        from zerokit.generate_bench import benchmark_main
        return benchmark_main(args, model, tokenizer)
    outs = generate_text(model, tokenizer, args.prompt, strategy=args.strategy, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, num_beams=args.num_beams,
                         seed=args.seed, batch_size=args.batch_size, synced_gpus=False,
                         no_repeat_ngram_size=args.no_repeat_ngram_size, repetition_penalty=args.repetition_penalty,
                         length_penalty=args.length_penalty)
    for i, (prompt, text) in enumerate(zip(args.prompt, outs)):
        if args.jsonl:
            print(json.dumps({"prompt": prompt, "completion": text}))
        else:
            print(f"=== prompt {i + 1} ===\n{prompt}\n--- completion ---\n{text}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(generate_main())
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
