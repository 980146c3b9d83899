"""Fine-tuning tasks: SST-2 sentiment classification and DialogSum summarisation.

A task gives the training loop three things (the loop knows nothing about the data):

* `train_batches(micro_batch_size, grad_accum, rank, world_size, seed)` -> a `TaskBatches`
  iterator whose `next_window()` returns the `grad_accum` micro-batches of this rank for one
  optimizer step. Determinism contract (same as the pretraining loader): the global sample
  order is the concatenation of seeded per-epoch permutations; step s uses global samples
  [s*G, (s+1)*G) with G = mb*accum*world, and rank r's micro-batch k is the mb positions of
  piece `slot(k, r)` of that window (k*world + r, the rank order reversed on odd k). `state_dict()` = {"samples_seen": n} makes resume exact.
  Given text lengths, the window is first sorted by length:
  the same samples make the step (the gradient is unchanged: the loss is normalised over the whole
  window), but with gradient accumulation each micro-batch pads far less, and micro-batch k holds
  neighbouring lengths on every rank, so no rank waits for one with longer texts.
  `group_by_length` goes further (Hugging Face Trainer's option, per global batch here): each epoch's
  permutation is cut into chunks of 50 global batches, each sorted by length and its batches
  shuffled again, so whole steps hold similar lengths. Faster still, but it changes what a step
  averages over (on SST-2 with MiniLM + LoRA it was no more accurate for ~2x the throughput).
"""
from __future__ import annotations

import contextlib
import csv
import inspect
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from zerokit.errors import UsageError

IGNORE_INDEX = -100
_LOCAL_EXTS = (".tsv", ".csv", ".jsonl", ".json")
# File names tried, in order, when a local *folder* is given with a split name.
_SPLIT_FILES = {
    "train": ("train", "train_full"),
    "validation": ("validation", "dev", "val", "valid"),
    "test": ("test",),
}


# ----------------------------------------------------------------------------- reading records

def load_records(spec: str | os.PathLike | Sequence[dict], split: str = "train") -> list[dict]:
    """Read a split as a list of dicts.

    `spec` is a list of dicts (returned as a copy), a local file (.tsv/.csv/.jsonl/.json; `split`
    is then ignored), a local folder (holding e.g. `dev.tsv` for split "validation"), or a hub
    dataset name, optionally "name:config" (`datasets.load_dataset(name, config, split=split)`).
    """
    if isinstance(spec, (list, tuple)):
        return [dict(r) for r in spec]
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        return _read_file(_find_split_file(path, split))
    if path.is_file():
        return _read_file(path)
    if text.lower().endswith(_LOCAL_EXTS) or text.startswith(("/", ".", "~")) or os.sep + os.sep in text:
        raise UsageError(f"data file not found: {text}; check the path (relative paths start from {os.getcwd()})")
    return _load_hub(text, split)


def _find_split_file(folder: Path, split: str) -> Path:
    stems = _SPLIT_FILES.get(split, (split,))
    for stem in stems:
        for ext in _LOCAL_EXTS:
            if (folder / f"{stem}{ext}").is_file():
                return folder / f"{stem}{ext}"
    wanted = ", ".join(f"{s}{{{','.join(_LOCAL_EXTS)}}}" for s in stems)
    raise UsageError(f"no file for split {split!r} in {folder}; expected one of {wanted}, or give the file path itself")


def _read_file(path: Path) -> list[dict]:
    ext = path.suffix.lower()
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if ext in (".tsv", ".csv"):
                # GLUE TSVs are unquoted (sentences contain bare '"'), so TSV is read without quoting.
                reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if ext == ".tsv" else csv.DictReader(f)
                rows = list(reader)
                if reader.fieldnames is None:
                    raise UsageError(f"{path} is empty; it needs a header line naming the columns")
                if any(None in r for r in rows):
                    bad = next(i for i, r in enumerate(rows) if None in r)
                    raise UsageError(f"{path} line {bad + 2} has more fields than the header; fix the row or the delimiter")
                return rows
            if ext == ".jsonl":
                rows = []
                for n, line in enumerate(f, 1):
                    if line.strip():
                        rows.append(_json_object(line, path, n))
                return rows
            if ext == ".json":
                data = json.load(f)
                if isinstance(data, dict) and isinstance(data.get("data"), list):
                    data = data["data"]
                if not isinstance(data, list):
                    raise UsageError(f"{path} must hold a JSON list of objects (or {{\"data\": [...]}}); use JSONL for one object per line")
                return [_check_object(r, path, i + 1) for i, r in enumerate(data)]
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text ({e}); re-encode it as UTF-8") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON ({e}); fix the file") from None
    raise UsageError(f"unsupported data file type {path.suffix!r} for {path}; use one of {', '.join(_LOCAL_EXTS)}")


def _json_object(line: str, path: Path, n: int) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} line {n} is not valid JSON ({e}); fix or remove that line") from None
    return _check_object(obj, path, n)


def _check_object(obj: Any, path: Path, n: int) -> dict:
    if not isinstance(obj, dict):
        raise UsageError(f"{path} record {n} is a {type(obj).__name__}, not an object; each record must be a JSON object")
    return obj


def _load_hub(name: str, split: str) -> list[dict]:
    repo, _, config = name.partition(":")
    try:
        import datasets
        ds = datasets.load_dataset(repo, config or None, split=split)
    except Exception as e:  # network, unknown name, unknown split: all things the user fixes
        raise UsageError(f"could not load dataset {name!r} split {split!r} from the hub ({type(e).__name__}: {e}); "
                         "check the name and network access, or pass a local file") from None
    return [dict(r) for r in ds]


def _column(records: list[dict], col: str, where: str, kind: type) -> list:
    out = []
    for i, r in enumerate(records):
        if col not in r:
            raise UsageError(f"{where}: record {i} has no column {col!r} (columns: {sorted(r)}); "
                             "fix the data or set the task's column option")
        v = r[col]
        if kind is str:
            if not isinstance(v, str):
                raise UsageError(f"{where}: record {i} column {col!r} is {type(v).__name__}, expected text")
        else:
            try:
                v = int(v)
            except (TypeError, ValueError):
                raise UsageError(f"{where}: record {i} column {col!r} = {v!r} is not an integer label") from None
        out.append(v)
    return out


# ----------------------------------------------------------------------------- batching helpers

def pad(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right", value: int | None = None) -> torch.Tensor:
    """Pad id lists to the longest one. `value` overrides the pad value (e.g. -100 for labels)."""
    length = max(len(s) for s in seqs)
    fill = pad_id if value is None else value
    out = torch.full((len(seqs), length), fill, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            if side == "right":
                out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            else:
                out[i, length - len(s):] = torch.tensor(s, dtype=torch.long)
    return out


def _attention_mask(seqs: Sequence[Sequence[int]], side: str) -> torch.Tensor:
    return pad([[1] * len(s) for s in seqs], 0, side)


class TaskBatches:
    """Deterministic, resumable train iterator over `n_samples` examples (see module docstring)."""

    GROUP_BATCHES = 50  # global batches per length-sorted chunk (HF's megabatch_mult)

    def __init__(self, n_samples: int, collate: Callable[[list[int]], dict], micro_batch_size: int,
                 grad_accum: int, rank: int, world_size: int, seed: int, lengths: Sequence[int] | None = None,
                 group_by_length: bool = False):
        if n_samples < 1:
            raise UsageError("the training split is empty; give a file with at least one record")
        if micro_batch_size < 1 or grad_accum < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise UsageError(f"bad batch layout mb={micro_batch_size} accum={grad_accum} rank={rank} world={world_size}; "
                             "need mb>=1, accum>=1, 0<=rank<world")
        self.n, self.collate = n_samples, collate
        self.mb, self.accum, self.rank, self.world, self.seed = micro_batch_size, grad_accum, rank, world_size, seed
        self.samples_seen = 0
        self._perms: dict[int, np.ndarray] = {}
        self.lengths = None if lengths is None else np.asarray(lengths)
        if self.lengths is not None and len(self.lengths) != n_samples:
            raise ValueError(f"{len(self.lengths)} lengths for {n_samples} samples")
        if group_by_length and self.lengths is None:
            raise ValueError("group_by_length needs the samples' lengths")
        self.group_by_length = group_by_length

    @property
    def global_batch(self) -> int:
        return self.mb * self.accum * self.world

    @property
    def epoch(self) -> int:
        return self.samples_seen // self.n

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            # A window straddles at most two epochs: keep only the newest two permutations.
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(self.n)
            if self.group_by_length:
                perm = self._group_by_length(perm, rng)
            self._perms[epoch] = perm
        return self._perms[epoch]

    def _group_by_length(self, perm: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        g = self.global_batch
        chunk = g * self.GROUP_BATCHES
        out = []
        for c in range(0, self.n, chunk):
            part = perm[c:c + chunk]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            batches = [part[i:i + g] for i in range(0, len(part), g)]
            out += [batches[i] for i in rng.permutation(len(batches))]
        return np.concatenate(out)

    def global_indices(self, start: int, count: int) -> list[int]:
        """Dataset indices of global stream positions [start, start+count)."""
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(start, start + count)]

    def slot(self, k: int, rank: int) -> int:
        """Which of the window's mb-sized pieces is micro-batch k of `rank`: in rank order on even k,
        reversed on odd k, so that over an accumulation window every rank gets as many of the
        (length-sorted) longer pieces as the others."""
        return k * self.world + (rank if k % 2 == 0 else self.world - 1 - rank)

    def next_window(self) -> list[dict]:
        idx = self.global_indices(self.samples_seen, self.global_batch)
        if self.lengths is not None:
            idx = sorted(idx, key=lambda i: self.lengths[i])
        window = []
        for k in range(self.accum):
            start = self.slot(k, self.rank) * self.mb
            window.append(self.collate(idx[start:start + self.mb]))
        self.samples_seen += self.global_batch
        return window

    def __iter__(self) -> Iterator[list[dict]]:
        while True:
            yield self.next_window()

    def state_dict(self) -> dict:
        return {"samples_seen": self.samples_seen, "seed": self.seed, "n_samples": self.n}

    def load_state_dict(self, state: dict) -> None:
        """Continue the global stream of `state`; the rank split (world size, micro-batch) may differ."""
        if state.get("n_samples", self.n) != self.n:
            raise UsageError(f"loader state is for {state['n_samples']} training samples, this task has {self.n}; "
                             "resume with the same training data")
        self.samples_seen = int(state["samples_seen"])
        self.seed = int(state.get("seed", self.seed))
        self._perms = {}


def _dist_active(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


def _all_reduce_sum(t: torch.Tensor, world_size: int) -> torch.Tensor:
    if _dist_active(world_size):
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def shard_batches(n: int, batch_size: int, rank: int, world_size: int) -> Iterator[list[int]]:
    """Rank `rank`'s eval batches over indices rank, rank+world, ...; every rank yields the same
    number of batches (ZeRO-3 forwards are collective). A rank with nothing left yields [] so the
    caller runs a throw-away batch and counts nothing from it."""
    per_rank = math.ceil(n / world_size)
    mine = list(range(rank, n, world_size))
    for b in range(math.ceil(per_rank / batch_size)):
        yield mine[b * batch_size:(b + 1) * batch_size]


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _is_encoder_decoder(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None) or getattr(getattr(model, "module", None), "config", None)  # DDP-style wrappers
    return bool(getattr(config, "is_encoder_decoder", False))


def _takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the Hugging Face model under any wrappers (DDP, DeepSpeed, peft) takes `logits_to_keep`."""
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """eval() + no_grad for the block, then the model's previous train/eval mode again."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- SST-2

class SentimentTask:
    """Sentence classification (SST-2 by default: columns `sentence`, `label`)."""

    kind = "sentiment"

    def __init__(self, tokenizer, train, validation, max_length: int = 128, text_column: str = "sentence",
                 label_column: str = "label", num_labels: int = 2, eval_batch_size: int = 64):
        if tokenizer.pad_token_id is None:
            raise UsageError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token) before building the task")
        self.tokenizer, self.max_length, self.num_labels = tokenizer, max_length, num_labels
        self.eval_batch_size = eval_batch_size
        self.train_texts, self.train_labels = self._read(train, "train", text_column, label_column)
        self.val_texts, self.val_labels = self._read(validation, "validation", text_column, label_column)

    def _read(self, spec, split, text_col, label_col):
        if spec is None:
            return [], []
        recs = load_records(spec, split)
        where = f"{spec if not isinstance(spec, (list, tuple)) else 'records'} ({split})"
        texts, labels = _column(recs, text_col, where, str), _column(recs, label_col, where, int)
        bad = [y for y in labels if not 0 <= y < self.num_labels]
        if bad:
            raise UsageError(f"{where}: label {bad[0]} outside 0..{self.num_labels - 1}; "
                             "set num_labels or fix the data (unlabelled test splits cannot be used)")
        return texts, labels

    def collate(self, texts: list[str], labels: list[int]) -> dict:
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        return {"input_ids": pad(ids, self.tokenizer.pad_token_id), "attention_mask": _attention_mask(ids, "right"),
                "labels": torch.tensor(labels, dtype=torch.long)}

    def train_batches(self, micro_batch_size: int, grad_accum: int, rank: int, world_size: int, seed: int,
                      group_by_length: bool = False) -> TaskBatches:
        def collate(idx):
            return self.collate([self.train_texts[i] for i in idx], [self.train_labels[i] for i in idx])
        return TaskBatches(len(self.train_texts), collate, micro_batch_size, grad_accum, rank, world_size, seed,
                           lengths=[len(t) for t in self.train_texts], group_by_length=group_by_length)

    def _logits(self, model, batch) -> torch.Tensor:
        dev = _model_device(model)
        logits = model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)).logits
        if logits.size(-1) != self.num_labels:
            raise UsageError(f"the model has {logits.size(-1)} outputs but the task has {self.num_labels} labels; "
                             f"load it with num_labels={self.num_labels}")
        return logits

    def loss(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self._logits(model, batch)
        labels = batch["labels"].to(logits.device)
        return F.cross_entropy(logits.float(), labels, reduction="sum"), torch.tensor(labels.numel(), device=logits.device)

    def evaluate(self, model, rank: int = 0, world_size: int = 1) -> dict:
        n = len(self.val_texts)
        if n == 0:
            raise UsageError("no validation data; give the task a validation split")
        dev = _model_device(model)
        sums = torch.zeros(3, dtype=torch.float64, device=dev)  # loss sum, correct, count
        with eval_mode(model):
            for idx in shard_batches(n, self.eval_batch_size, rank, world_size):
                real = bool(idx)
                idx = idx or [0]  # throw-away batch keeps the collective forward count equal
                batch = self.collate([self.val_texts[i] for i in idx], [self.val_labels[i] for i in idx])
                logits = self._logits(model, batch).float()
                if real:
                    labels = batch["labels"].to(logits.device)
                    sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
                    sums[1] += (logits.argmax(-1) == labels).sum()
                    sums[2] += len(idx)
        _all_reduce_sum(sums, world_size)
        return {"val_loss": (sums[0] / sums[2]).item(), "val_accuracy": (sums[1] / sums[2]).item(),
                "val_samples": int(sums[2].item())}


# ----------------------------------------------------------------------------- DialogSum

def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Mean ROUGE-1/2/L F-measure in percent (rouge_score, Porter stemming), as DialogSum reports."""
    sums = rouge_sums(predictions, references)
    return {k: 100.0 * v / max(len(predictions), 1) for k, v in sums.items()}


def rouge_sums(predictions: Sequence[str], references: Sequence[str]) -> dict:
    from rouge_score import rouge_scorer
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    sums = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, r in zip(predictions, references):
        s = scorer.score(r, p)  # score(target, prediction)
        for k in sums:
            sums[k] += s[k].fmeasure
    return sums


class SummarizationTask:
    """Dialogue summarisation SFT (DialogSum columns `dialogue`, `summary`).

    Decoder-only models: input = [bos] + template(dialogue) + " " + summary + [eos]; only the
    summary and eos tokens are trained. The dialogue is cut in the middle (its opening and its
    end carry the most) so the prompt and the whole (capped) summary always fit `max_length`.
    Encoder-decoder models (`encoder_decoder=True`, e.g. BART/T5): encoder input = template(dialogue),
    labels = summary + eos.
    """

    kind = "summarization"

    def __init__(self, tokenizer, train, validation, max_length: int = 512, max_target_length: int = 128,
                 prompt_template: str = "Summarize the dialogue.\n{dialogue}\nSummary:",
                 dialogue_column: str = "dialogue", summary_column: str = "summary", encoder_decoder: bool = False,
                 max_eval_samples: int | None = None, eval_batch_size: int = 8, max_new_tokens: int = 96,
                 strategy: str = "greedy", num_beams: int = 4, predictions_path: str | os.PathLike | None = None):
        if prompt_template.count("{dialogue}") != 1:
            raise UsageError(f"prompt_template must contain '{{dialogue}}' exactly once, got {prompt_template!r}")
        if tokenizer.eos_token_id is None:
            raise UsageError("the tokenizer has no eos token; summaries end with eos so generation can stop — set tokenizer.eos_token")
        self.tokenizer, self.encoder_decoder = tokenizer, encoder_decoder
        self.max_length, self.max_target_length = max_length, max_target_length
        self.max_eval_samples, self.eval_batch_size = max_eval_samples, eval_batch_size
        self.max_new_tokens, self.strategy, self.num_beams = max_new_tokens, strategy, num_beams
        self.predictions_path = predictions_path  # the loop may set this before each evaluate()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        head, tail = prompt_template.split("{dialogue}")
        enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []
        self._enc = enc
        self.head_ids, self.tail_ids = enc(head), enc(tail)
        self.prefix_ids, self.suffix_ids = _special_wrapping(tokenizer)
        if not encoder_decoder:
            self.suffix_ids = []  # a causal prompt ends where the summary starts: no [SEP]/eos there
        self.prompt_ids("", max(max_target_length, max_new_tokens))  # a too small max_length fails here, not mid-run
        self.train_recs = self._read(train, "train", dialogue_column, summary_column)
        self.val_recs = self._read(validation, "validation", dialogue_column, summary_column)

    def _read(self, spec, split, dcol, scol) -> list[tuple[str, str]]:
        if spec is None:
            return []
        recs = load_records(spec, split)
        where = f"{spec if not isinstance(spec, (list, tuple)) else 'records'} ({split})"
        return list(zip(_column(recs, dcol, where, str), _column(recs, scol, where, str)))

    # -- encoding
    def _target_ids(self, summary: str) -> list[int]:
        # The leading space makes the summary tokenise as it would after "Summary:" in running text.
        text = summary.strip() if self.encoder_decoder else " " + summary.strip()
        return self._enc(text)[: self.max_target_length - 1] + [self.tokenizer.eos_token_id]

    def prompt_ids(self, dialogue: str, reserve: int) -> list[int]:
        """Prompt token ids with the dialogue middle-cut so that `reserve` more tokens fit max_length."""
        fixed = len(self.prefix_ids) + len(self.head_ids) + len(self.tail_ids) + len(self.suffix_ids)
        budget = self.max_length - fixed - (0 if self.encoder_decoder else reserve)
        if budget < 1:
            raise UsageError(f"max_length={self.max_length} leaves no room for the dialogue after the template "
                             f"({fixed} tokens) and {reserve} summary tokens; raise max_length or lower max_target_length/max_new_tokens")
        d = self._enc(dialogue)
        if len(d) > budget:
            keep_head = budget // 2
            d = d[:keep_head] + d[len(d) - (budget - keep_head):]
        return self.prefix_ids + self.head_ids + d + self.tail_ids + self.suffix_ids

    def encode(self, dialogue: str, summary: str) -> dict:
        """One training example: for decoder-only, input_ids and targets (shifted, -100 off-summary)."""
        tgt = self._target_ids(summary)
        prompt = self.prompt_ids(dialogue, len(tgt))
        if self.encoder_decoder:
            return {"input_ids": prompt, "labels": tgt}
        full = prompt + tgt
        # targets[t] is the label for logits[t] (the token after position t); the last token only
        # needs to be a label, so the input drops it.
        targets = [IGNORE_INDEX] * (len(prompt) - 1) + tgt
        return {"input_ids": full[:-1], "targets": targets}

    def collate(self, pairs: list[tuple[str, str]]) -> dict:
        ex = [self.encode(d, s) for d, s in pairs]
        ids = [e["input_ids"] for e in ex]
        out = {"input_ids": pad(ids, self.pad_id), "attention_mask": _attention_mask(ids, "right")}
        key = "labels" if self.encoder_decoder else "targets"
        out[key] = pad([e[key] for e in ex], self.pad_id, value=IGNORE_INDEX)
        return out

    def train_batches(self, micro_batch_size: int, grad_accum: int, rank: int, world_size: int, seed: int,
                      group_by_length: bool = False) -> TaskBatches:
        return TaskBatches(len(self.train_recs), lambda idx: self.collate([self.train_recs[i] for i in idx]),
                           micro_batch_size, grad_accum, rank, world_size, seed,
                           lengths=[len(d) + len(s) for d, s in self.train_recs], group_by_length=group_by_length)

    # -- loss
    def loss(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if _is_encoder_decoder(model) != self.encoder_decoder:
            raise UsageError(f"the model is {'encoder-decoder' if _is_encoder_decoder(model) else 'decoder-only'} but the task was "
                             f"built with encoder_decoder={self.encoder_decoder}; build it with encoder_decoder={_is_encoder_decoder(model)}")
        dev = _model_device(model)
        ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
        if self.encoder_decoder:
            labels = batch["labels"].to(dev)
            # Passing labels lets the model build its own shifted decoder inputs; we still sum ourselves.
            logits = model(input_ids=ids, attention_mask=mask, labels=labels).logits
        else:
            labels = batch["targets"].to(dev)
            # Vocabulary logits only from the batch's first summary position on: the prompt's are never
            # scored, and with a 30k vocabulary (MiniLM as a causal LM) they cost as many FLOPs as its layers.
            first = int((labels != IGNORE_INDEX).int().argmax(dim=1).min())
            keep = {"logits_to_keep": labels.size(1) - first} if _takes_logits_to_keep(model) else {}
            logits = model(input_ids=ids, attention_mask=mask, **keep).logits
            labels = labels[:, labels.size(1) - logits.size(1):]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
        return loss, (labels != IGNORE_INDEX).sum()

    # -- evaluation
    def evaluate(self, model, rank: int = 0, world_size: int = 1) -> dict:
        from zerokit.generate import generate_text

        recs = self.val_recs[: self.max_eval_samples] if self.max_eval_samples else self.val_recs
        if not recs:
            raise UsageError("no validation data; give the task a validation split")
        n = len(recs)
        mine = list(range(rank, n, world_size))
        prompts = [self.prompt_ids(recs[i][0], self.max_new_tokens) for i in mine]
        # generate_text equalises the number of generate calls across ranks itself.
        preds = generate_text(model, self.tokenizer, prompts, strategy=self.strategy, num_beams=self.num_beams,
                              max_new_tokens=self.max_new_tokens, batch_size=self.eval_batch_size,
                              synced_gpus=_dist_active(world_size))
        dev = _model_device(model)
        r = rouge_sums(preds, [recs[i][1] for i in mine])
        loss_sum, n_tok = self._val_loss_sums(model, recs, rank, world_size)
        sums = torch.tensor([r["rouge1"], r["rouge2"], r["rougeL"], len(mine), loss_sum, n_tok],
                            dtype=torch.float64, device=dev)
        _all_reduce_sum(sums, world_size)
        if self.predictions_path is not None:
            self._write_predictions([(i, recs[i], p) for i, p in zip(mine, preds)], rank, world_size)
        count = sums[3].item()
        return {"rouge1": 100 * sums[0].item() / count, "rouge2": 100 * sums[1].item() / count,
                "rougeL": 100 * sums[2].item() / count, "val_loss": sums[4].item() / max(sums[5].item(), 1),
                "val_samples": int(count)}

    def _val_loss_sums(self, model, recs, rank, world_size) -> tuple[float, float]:
        loss_sum, n_tok = 0.0, 0.0
        with eval_mode(model):
            for idx in shard_batches(len(recs), self.eval_batch_size, rank, world_size):
                real = bool(idx)
                loss, n = self.loss(model, self.collate([recs[i] for i in (idx or [0])]))
                if real:
                    loss_sum, n_tok = loss_sum + loss.item(), n_tok + n.item()
        return loss_sum, n_tok

    def _write_predictions(self, rows, rank, world_size) -> None:
        if _dist_active(world_size):
            gathered = [None] * world_size
            dist.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        if rank != 0:
            return
        path = Path(self.predictions_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for i, (dialogue, ref), pred in sorted(rows, key=lambda r: r[0]):
                f.write(json.dumps({"index": i, "prediction": pred, "reference": ref, "dialogue": dialogue}) + "\n")


def _special_wrapping(tokenizer) -> tuple[list[int], list[int]]:
    """The special ids the tokenizer puts before / after a text ([bos] for Llama, [CLS]..[SEP] for
    BERT, nothing for GPT-2), found by comparing a tokenisation with and without them."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []


# ----------------------------------------------------------------------------- factory

TASKS = {"sentiment": SentimentTask, "sst2": SentimentTask, "summarization": SummarizationTask, "dialogsum": SummarizationTask}


def build_task(kind: str, tokenizer, train, validation, **opts):
    """`kind` in sentiment|sst2|summarization|dialogsum; `train`/`validation` as for `load_records`."""
    if kind not in TASKS:
        raise UsageError(f"unknown task {kind!r}; choose one of {', '.join(sorted(TASKS))}")
    try:
        return TASKS[kind](tokenizer, train, validation, **opts)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise UsageError(f"task {kind!r}: {e}; remove or rename that option") from None
        raise
