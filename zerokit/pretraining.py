"""The pre-training task: next-token loss on packed windows, validation loss and bits per
byte, and a generated sample. The same `loss`/`evaluate` verbs as the fine-tuning tasks."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from zerokit.dist import all_reduce_sum
from zerokit.errors import UsageError
from zerokit.moe import RouterStats

log = logging.getLogger("zerokit")

PREPARE_MIN_MB = 256  # data.prepare=auto: local corpora of this many MB or more are streamed by zerokit prepare


def prepare_data(data, cache: Path):
    """Tokenizer (trained on the training split only) and packed train/val shards, both cached.
    `data` is the recipe's `data` config section.

    Every rank calls it: the first does the work under a file lock while the others wait on the lock
    (not in a collective, which gives up after the process-group timeout that a large corpus outlasts),
    then find it done. A run whose local source files and tokenizer are unchanged (paths, sizes, mtimes)
    is served from a small memo without reading or hashing the corpus again. A corpus that wants_prepare
    goes through `zerokit prepare` into the cache instead (prepare_in_cache), the same way under a lock."""
    from transformers import AutoTokenizer

    from zerokit.data.packed import corpus_texts, pack_corpus, source_fingerprint
    from zerokit.data.prepare import is_prepared
    from zerokit.data.tokenizer import TRAIN_KINDS, get_tokenizer, take_sample
    from zerokit.locks import exclusive
    if is_prepared(data.corpus):  # `zerokit prepare` output: its own tokenizer and shards, nothing to do
        corpus = Path(str(data.corpus)).expanduser()
        log.info("prepared corpus %s (its tokenizer; data.tokenizer and data.vocab_size do not apply)", corpus)
        return AutoTokenizer.from_pretrained(corpus / "tokenizer"), corpus
    if wants_prepare(data):
        corpus = prepare_in_cache(data, cache)
        return AutoTokenizer.from_pretrained(corpus / "tokenizer"), corpus
    tok_spec = str(data.tokenizer)
    source = source_fingerprint(data.corpus)
    inputs = {"source": source, "text_field": data.text_field, "sample_mb": data.get("tokenizer_sample_mb"), "val_fraction": data.val_fraction, "tokenizer": tok_spec,
              "vocab_size": data.vocab_size if tok_spec in TRAIN_KINDS else None,
              "tokenizer_files": source_fingerprint(tok_spec) if Path(tok_spec).expanduser().is_dir() else None}
    memo = cache / "prepared" / (hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20] + ".json")
    with exclusive(memo):
        if source is not None and memo.is_file():
            hit = json.loads(memo.read_text())
            if (Path(hit["data"]) / "index.json").is_file() and Path(hit["tokenizer"]).is_dir():
                log.info("data cache hit (source unchanged): %s", hit["data"])
                return AutoTokenizer.from_pretrained(hit["tokenizer"]), Path(hit["data"])
        train_texts = take_sample(corpus_texts(data.corpus, data.text_field, data.val_fraction),
                                  data.get("tokenizer_sample_mb")) if tok_spec in TRAIN_KINDS else None
        tok_dir, tokenizer = get_tokenizer(data.tokenizer, train_texts, data.vocab_size, cache / "tokenizers")
        data_dir = pack_corpus(data.corpus, tok_dir, tokenizer, cache / "data", data.val_fraction, data.text_field)
        if source is not None:  # a hub dataset has no cheap fingerprint: it is read (datasets caches it) each time
            tmp = memo.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"tokenizer": str(Path(tok_dir).resolve()), "data": str(data_dir.resolve()),
                                       "inputs": inputs}))
            tmp.replace(memo)
    return tokenizer, data_dir


def wants_prepare(data) -> bool:
    """Whether a raw `data.corpus` goes through `zerokit prepare` (streamed into the cache's token shards,
    validation = whole held-out documents) rather than the in-memory packer (`data.prepare`: auto | always |
    never). auto: a datasets name, a glob, a format the packer does not read (.jsonl.gz, .parquet), or at
    least PREPARE_MIN_MB of local files; never a single .txt (one document: the packer splits it by bytes,
    which is what the tiny-shakespeare demo's documented result rests on)."""
    from zerokit.data.sources import source_files
    mode, spec = str(data.get("prepare") or "auto"), "tinyshakespeare" if data.corpus is None else str(data.corpus)
    try:
        files = source_files(spec)
    except UsageError:  # missing or empty: the packer's (or with always, prepare's) own message says what is wrong
        return mode == "always"
    one_text = files is not None and len(files) == 1 and files[0].name.endswith(".txt")
    if mode != "auto":
        if mode == "always" and one_text:
            raise UsageError(f"data.prepare=always: {spec} is one .txt file, one document, and a prepared corpus holds "
                             "out whole documents for validation; use data.prepare=auto (the packer splits a text by "
                             "bytes) or split the text into several files")
        return mode == "always"
    if files is None or any(c in spec for c in "*?["):
        return True
    if one_text:
        return False
    return (any(not f.name.endswith((".txt", ".jsonl")) for f in files)
            or sum(f.stat().st_size for f in files) >= PREPARE_MIN_MB * 1e6)


def prepare_in_cache(data, cache: Path) -> Path:
    """`zerokit prepare` of `data.corpus` into `cache/corpora/<name>-<key>`, once: the first rank does it
    under a file lock, the others then find its manifest (a stat, no reading). The key holds the settings
    and the source files' (path, size, mtime); a datasets name has no cheap fingerprint, so its folder is
    reused until deleted."""
    from zerokit.data.packed import usable_cores
    from zerokit.data.prepare import DEFAULTS, is_prepared, prepare
    from zerokit.data.sources import fingerprint
    from zerokit.data.tokenizer import TRAIN_KINDS
    from zerokit.locks import exclusive
    spec, tok_spec = "tinyshakespeare" if data.corpus is None else str(data.corpus), str(data.tokenizer)
    settings = {"text_field": data.text_field, "tokenizer": tok_spec, "vocab_size": data.vocab_size,
                "val_fraction": data.val_fraction, "sample_mb": data.get("tokenizer_sample_mb") or DEFAULTS["sample_mb"]}
    key = json.dumps({"source": spec, "files": fingerprint(spec), **settings,
                      "tokenizer_files": fingerprint(tok_spec) if tok_spec not in TRAIN_KINDS and Path(tok_spec).expanduser().is_dir() else None},
                     sort_keys=True)
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(spec.rstrip("/")).name)[:40] or "corpus"
    out = cache / "corpora" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    with exclusive(out):
        if is_prepared(out):
            log.info("prepared corpus cache hit: %s", out)
        else:
            log.info("data.corpus %s: zerokit prepare into %s (data.prepare=%s)", spec, out, data.get("prepare") or "auto")
            prepare(spec, out, workers=usable_cores(), **settings)
    return out


def causal_lm_loss_sum(model, batch: dict, router=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over positions whose target is not -100, and their count.
    With `router` (zerokit.moe.RouterStats) a mixture of experts' aux loss is added (see zerokit/moe.py)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    targets = batch["targets"]
    loss = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    n = (targets != -100).sum()
    return (loss if router is None else loss + router.add(model, out, n)), n


class PretrainTask:
    def __init__(self, data_dir: Path, block_size: int, micro_batch_size: int, eval_batches: int = 0):
        self.data_dir, self.block_size = Path(data_dir), block_size
        self.micro_batch_size, self.eval_batches = micro_batch_size, eval_batches or None
        self.router = RouterStats()  # MoE models: aux loss and load; nothing for dense ones

    def loss(self, model, batch: dict):
        return causal_lm_loss_sum(model, batch, self.router)

    def evaluate(self, model, rank: int, world_size: int) -> dict:
        """Validation loss (nats per token) and bits per byte: total nats over the UTF-8 bytes the
        predicted tokens stand for, divided by ln 2 (comparable across tokenizers)."""
        from zerokit.data.packed import eval_batches
        device = next(model.parameters()).device
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # nats, tokens, bytes
        for batch in eval_batches(self.data_dir, "val", self.block_size, self.micro_batch_size, rank, world_size,
                                  max_batches=self.eval_batches):
            weight = batch.get("weight", 1)
            nats, n = causal_lm_loss_sum(model, {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
            totals += torch.stack([nats.double(), n.double(), torch.tensor(float(batch["target_bytes"]), device=device)]) * weight
        nats, tokens, n_bytes = all_reduce_sum(totals).tolist()
        return {"val_loss": nats / tokens, "val_bpb": nats / n_bytes / math.log(2)}


def sample_text(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float, top_k: int,
                world_size: int, seed: int = 0) -> str:
    """One sampled continuation. Every rank calls it (ZeRO-3/FSDP shard the weights: synced_gpus)."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    cfg = model.config
    positions = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    if positions:  # learned position tables end at the context length
        max_new_tokens = max(0, min(max_new_tokens, positions - ids.shape[1]))
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature,
                             top_k=top_k, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id,
                             synced_gpus=world_size > 1)
    model.train(was_training)
    return tokenizer.decode(out[0], skip_special_tokens=True)
