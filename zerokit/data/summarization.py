"""Dialogue summarisation SFT (DialogSum by default): the task the summarization recipe trains, and its
evaluation (generated summaries scored with ROUGE, plus the validation loss)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from zerokit.data.batches import IGNORE_INDEX, TaskBatches, all_reduce_sum, attention_mask, dist_active, pad, shard_batches
from zerokit.data.records import read_columns
from zerokit.errors import UsageError
from zerokit.generate import generate_text
from zerokit.models import eval_mode, is_encoder_decoder_model, model_device, takes_logits_to_keep


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
                 strategy: str = "greedy", num_beams: int = 4, predictions_path: str | os.PathLike | None = None,
                 no_repeat_ngram_size: int = 0, repetition_penalty: float = 1.0, length_penalty: float = 1.0):
        if prompt_template.count("{dialogue}") != 1:
            raise UsageError(f"prompt_template must contain '{{dialogue}}' exactly once, got {prompt_template!r}")
        if tokenizer.eos_token_id is None:
            raise UsageError("the tokenizer has no eos token; summaries end with eos so generation can stop — set tokenizer.eos_token")
        self.tokenizer, self.encoder_decoder = tokenizer, encoder_decoder
        self.max_length, self.max_target_length = max_length, max_target_length
        self.max_eval_samples, self.eval_batch_size = max_eval_samples, eval_batch_size
        self.max_new_tokens, self.strategy, self.num_beams = max_new_tokens, strategy, num_beams
        self.decoding = dict(no_repeat_ngram_size=no_repeat_ngram_size, repetition_penalty=repetition_penalty,
                             length_penalty=length_penalty)
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
        _, (dialogues, summaries) = read_columns(spec, split, [(dcol, str), (scol, str)])
        return list(zip(dialogues, summaries))

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
        out = {"input_ids": pad(ids, self.pad_id), "attention_mask": attention_mask(ids, "right")}
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
        if is_encoder_decoder_model(model) != self.encoder_decoder:
            raise UsageError(f"the model is {'encoder-decoder' if is_encoder_decoder_model(model) else 'decoder-only'} but the task was "
                             f"built with encoder_decoder={self.encoder_decoder}; build it with encoder_decoder={is_encoder_decoder_model(model)}")
        dev = model_device(model)
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
            keep = {"logits_to_keep": labels.size(1) - first} if takes_logits_to_keep(model) else {}
            logits = model(input_ids=ids, attention_mask=mask, **keep).logits
            labels = labels[:, labels.size(1) - logits.size(1):]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
        return loss, (labels != IGNORE_INDEX).sum()

    # -- evaluation
    def evaluate(self, model, rank: int = 0, world_size: int = 1) -> dict:
        recs = self.val_recs[: self.max_eval_samples] if self.max_eval_samples else self.val_recs
        if not recs:
            raise UsageError("no validation data; give the task a validation split")
        n = len(recs)
        mine = list(range(rank, n, world_size))
        prompts = [self.prompt_ids(recs[i][0], self.max_new_tokens) for i in mine]
        # generate_text equalises the number of generate calls across ranks itself; WordPiece summaries take
        # their spacing and casing from the dialogue (#Person1#, names).
        preds = generate_text(model, self.tokenizer, prompts, strategy=self.strategy, num_beams=self.num_beams,
                              max_new_tokens=self.max_new_tokens, batch_size=self.eval_batch_size,
                              synced_gpus=dist_active(world_size), sources=[recs[i][0] for i in mine], **self.decoding)
        dev = model_device(model)
        r = rouge_sums(preds, [recs[i][1] for i in mine])
        loss_sum, n_tok = self._val_loss_sums(model, recs, rank, world_size)
        sums = torch.tensor([r["rouge1"], r["rouge2"], r["rougeL"], len(mine), loss_sum, n_tok],
                            dtype=torch.float64, device=dev)
        all_reduce_sum(sums, world_size)
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
        if dist_active(world_size):
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

