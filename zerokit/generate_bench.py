"""`zerokit generate --benchmark`: prefill and decode tokens/s of `generate` with a dynamic, a static or no
KV cache, at batch sizes 1..N, and of transformers' continuous batching (`generate_batch`: a paged KV cache,
requests scheduled token by token) on the same prompts. Greedy and fixed length (eos ignored, as throughput
benchmarks do), so every mode must produce the very same tokens: each row says whether it did.

Times: `generate` calls a logits processor once per new token, right after that step's forward, so the first
call ends the prefill (the prompt's forward plus set-up such as a static cache's allocation: time to first
token) and the rest are decode steps. Continuous batching records when each request was added (its manager's
start-up, startup_s, is before that) and a timestamp per token; its prefill ends when the last request has its
first token. shutdown_s is the time from the last token to the call's return (continuous batching stops its
scheduler thread, restores the attention implementation and runs gc.collect there). total_s is the whole call.
"""
from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from zerokit.data.batches import pad
from zerokit.errors import UsageError
from zerokit.models import eval_mode

MODES = ("dynamic", "static", "none", "paged")
PAGE_SIZE = 32  # tokens per page of the paged cache: small, as CPU prompts are


class StepClock(LogitsProcessor):
    """The time of each generation step, taken after its forward (the scores pass unchanged)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def cache_bytes(cache) -> int:
    """Bytes of a transformers Cache's key and value tensors (what the model keeps per generated sequence)."""
    if cache is None:
        return 0
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor))


def _row(mode, prompts, new_tokens, generated, prefill_start, steps_first, steps_last, start, end, kv_bytes):
    prompt_tokens = sum(map(len, prompts))
    prefill_s, decode_s = steps_first - prefill_start, steps_last - steps_first
    decode_tokens = generated - len(prompts)  # each request's first token comes out of its prefill
    return {"mode": mode, "batch": len(prompts), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "generated_tokens": generated, "decode_tokens": decode_tokens, "startup_s": prefill_start - start,
            "prefill_s": prefill_s,
            "decode_s": decode_s, "shutdown_s": end - steps_last, "total_s": end - start,
            "prefill_tok_s": prompt_tokens / prefill_s,
            "decode_tok_s": decode_tokens / decode_s if decode_s > 0 else None,
            "e2e_tok_s": generated / (end - start), "kv_cache_bytes": kv_bytes}


def run_generate(model, prompts: list[list[int]], new_tokens: int, mode: str, pad_id: int):
    """One batched `generate` (left padding) in `mode` dynamic | static | none; (row, new tokens per prompt)."""
    device = next(model.parameters()).device
    input_ids = pad(prompts, pad_id, "left").to(device)
    mask = pad([[1] * len(p) for p in prompts], 0, "left").to(device)
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=pad_id,
                  use_cache=mode != "none", return_dict_in_generate=True)
    if mode == "static":
        kwargs["cache_implementation"] = "static"
    clock = StepClock()
    start = time.perf_counter()
    out = model.generate(input_ids=input_ids, attention_mask=mask, logits_processor=LogitsProcessorList([clock]), **kwargs)
    end = time.perf_counter()
    new = out.sequences[:, input_ids.size(1):]
    if new.size(1) != len(clock.times):
        raise RuntimeError(f"{new.size(1)} new tokens per row but {len(clock.times)} generation steps were timed")
    cache = getattr(out, "past_key_values", None) if mode != "none" else None
    row = _row(mode, prompts, new_tokens, new.numel(), start, clock.times[0], clock.times[-1], start, end, cache_bytes(cache))
    return row, new.tolist()


def run_paged(model, prompts: list[list[int]], new_tokens: int, pad_id: int):
    """transformers' continuous batching on the same prompts; its paged cache sized to hold all of them."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    longest = max(map(len, prompts)) + new_tokens
    pages = -(-longest // PAGE_SIZE) * len(prompts)
    # Sized here: left to itself it sizes the cache from free memory (GPU memory; on a CPU that took 50 s).
    cb = ContinuousBatchingConfig(page_size=PAGE_SIZE, num_blocks=pages + 1, max_batch_tokens=max(256, sum(map(len, prompts))))
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=pad_id)
    start = time.perf_counter()
    results = model.generate_batch(prompts, generation_config=config, continuous_batching_config=cb, warmup=False,
                                   record_timestamps=True, progress_bar=False)
    end = time.perf_counter()
    outs = sorted(results.values(), key=lambda r: int(r.request_id.rsplit("_", 1)[-1]))  # req_0, req_1, ...
    if len(outs) != len(prompts) or any(len(r.timestamps) != len(r.generated_tokens) for r in outs):
        raise RuntimeError(f"continuous batching returned {len(outs)} of {len(prompts)} requests, or untimed tokens")
    added = min(r.created_time for r in outs)  # the manager is up (cache allocated, scheduler thread running)
    first, last = max(r.timestamps[0] for r in outs), max(r.timestamps[-1] for r in outs)
    generated = sum(len(r.generated_tokens) for r in outs)
    row = _row("paged", prompts, new_tokens, generated, added, first, last, start, end, None)
    return row, [list(r.generated_tokens) for r in outs]


def benchmark_prompts(tokenizer, texts: list[str] | None, prompt_tokens: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts: the given texts, or `prompt_tokens` random non-special ids each (seeded)."""
    if texts:
        return [tokenizer(t)["input_ids"] or [tokenizer.eos_token_id] for t in texts]
    special = set(tokenizer.all_special_ids)
    allowed = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    g = torch.Generator().manual_seed(seed)
    return [allowed[torch.randint(0, len(allowed), (prompt_tokens,), generator=g)].tolist() for _ in range(64)]


def pad_id_of(tokenizer) -> int:
    return next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)


def run_benchmark(model, prompts: list[list[int]], batch_sizes: list[int], new_tokens: int, pad_id: int,
                  modes: tuple = MODES) -> list[dict]:
    """Every mode at every batch size on the first `batch` prompts (cycled); each row says whether its
    tokens equal the dynamic-cache `generate` of the same prompts (`same_as_dynamic`)."""
    unknown = [m for m in modes if m not in MODES]
    if unknown or not batch_sizes or min(batch_sizes) < 1 or new_tokens < 2:
        raise UsageError(f"--modes from {', '.join(MODES)} (got {','.join(modes)}), --batch_sizes >= 1, "
                         f"--max_new_tokens >= 2 (a prefill and a decode step)")
    cfg = model.config
    positions = getattr(cfg, "n_positions", None)  # a learned position table ends there
    if positions and max(map(len, prompts)) + new_tokens > positions:
        raise UsageError(f"prompts of {max(map(len, prompts))} tokens + max_new_tokens={new_tokens} exceed the model's "
                         f"{positions} positions; use shorter prompts (--prompt_tokens) or fewer new tokens")
    rows = []
    with eval_mode(model):
        run_generate(model, prompts[:1], 2, "dynamic", pad_id)  # warm-up: first-call set-up is not generation speed
        for batch in batch_sizes:
            chunk = [prompts[i % len(prompts)] for i in range(batch)]
            reference = None
            for mode in ("dynamic", *[m for m in modes if m != "dynamic"]):
                row, tokens = run_paged(model, chunk, new_tokens, pad_id) if mode == "paged" else \
                    run_generate(model, chunk, new_tokens, mode, pad_id)
                reference = tokens if mode == "dynamic" else reference
                row["same_as_dynamic"] = tokens == reference
                if mode in modes:
                    rows.append(row)
    return rows


def _fmt(v, spec=",.0f"):
    return "-" if v is None else (str(v) if isinstance(v, (bool, str)) else format(v, spec))


def table(rows: list[dict]) -> str:
    head = ["mode", "batch", "prompt tok", "new tok", "prefill tok/s", "decode tok/s", "end-to-end tok/s",
            "total s", "after last token s", "KV cache MiB", "same tokens"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        kv = None if r["kv_cache_bytes"] is None else r["kv_cache_bytes"] / 2**20
        lines.append("| " + " | ".join([r["mode"], str(r["batch"]), str(r["prompt_tokens"]), str(r["generated_tokens"]),
                                        _fmt(r["prefill_tok_s"]), _fmt(r["decode_tok_s"]), _fmt(r["e2e_tok_s"]),
                                        _fmt(r["total_s"], ".2f"), _fmt(r["shutdown_s"], ".2f"), _fmt(kv, ".2f"),
                                        _fmt(r["same_as_dynamic"])]) + " |")
    return "\n".join(lines)


def write_results(rows: list[dict], out: Path, setup: dict) -> list[Path]:
    """benchmark.json (setup + rows) and benchmark.csv, each written whole to a temporary file, then renamed."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "benchmark.json", out / "benchmark.csv"]
    tmp = [p.with_name(p.name + ".tmp") for p in paths]
    tmp[0].write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
    with open(tmp[1], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for t, p in zip(tmp, paths):
        t.replace(p)
    return paths


def benchmark_main(args, model, tokenizer) -> int:
    """`zerokit generate --benchmark ...` (the parser is zerokit.generate's)."""
    try:
        sizes = [int(b) for b in str(args.batch_sizes).split(",")]
    except ValueError:
        raise UsageError(f"--batch_sizes {args.batch_sizes!r}: give a comma list of integers, e.g. 1,2,4,8") from None
    modes = tuple(m.strip() for m in args.modes.split(","))
    if args.threads:  # on a shared CPU, fewer threads than cores can be much faster (no spinning on busy cores)
        torch.set_num_threads(args.threads)
    prompts = benchmark_prompts(tokenizer, args.prompt, args.prompt_tokens, args.seed or 0)
    rows = run_benchmark(model, prompts, sizes, args.max_new_tokens, pad_id_of(tokenizer), modes)
    device = next(model.parameters()).device
    setup = {"model": args.model, "device": str(device), "threads": torch.get_num_threads(),
             "load_average": os.getloadavg(), "dtype": str(next(model.parameters()).dtype),
             "attn_implementation": model.config._attn_implementation, "max_new_tokens": args.max_new_tokens,
             "prompts": "given" if args.prompt else f"{args.prompt_tokens} random tokens each",
             "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(f"generation benchmark: {args.model} on {device}, greedy, {args.max_new_tokens} new tokens, eos ignored; "
          f"load average {setup['load_average'][0]:.2f}\n")
    print(table(rows))
    if not all(r["same_as_dynamic"] for r in rows):
        print("note: some modes decoded other tokens than the dynamic cache (same_tokens False)")
    for p in write_results(rows, Path(args.out), setup):
        print(f"wrote {p}")
    return 0
