"""Sentence classification (SST-2 by default): the task the sentiment recipe trains and evaluates."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zerokit.data.batches import TaskBatches, all_reduce_sum, attention_mask, pad, shard_batches
from zerokit.data.records import read_columns
from zerokit.errors import UsageError
from zerokit.models import eval_mode, model_device


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
        where, (texts, labels) = read_columns(spec, split, [(text_col, str), (label_col, int)])
        bad = [y for y in labels if not 0 <= y < self.num_labels]
        if bad:
            raise UsageError(f"{where}: label {bad[0]} outside 0..{self.num_labels - 1}; "
                             "set num_labels or fix the data (unlabelled test splits cannot be used)")
        return texts, labels

    def collate(self, texts: list[str], labels: list[int]) -> dict:
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        return {"input_ids": pad(ids, self.tokenizer.pad_token_id), "attention_mask": attention_mask(ids, "right"),
                "labels": torch.tensor(labels, dtype=torch.long)}

    def train_batches(self, micro_batch_size: int, grad_accum: int, rank: int, world_size: int, seed: int,
                      group_by_length: bool = False) -> TaskBatches:
        def collate(idx):
            return self.collate([self.train_texts[i] for i in idx], [self.train_labels[i] for i in idx])
        return TaskBatches(len(self.train_texts), collate, micro_batch_size, grad_accum, rank, world_size, seed,
                           lengths=[len(t) for t in self.train_texts], group_by_length=group_by_length)

    def _logits(self, model, batch) -> torch.Tensor:
        dev = model_device(model)
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
        dev = model_device(model)
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
        all_reduce_sum(sums, world_size)
        return {"val_loss": (sums[0] / sums[2]).item(), "val_accuracy": (sums[1] / sums[2]).item(),
                "val_samples": int(sums[2].item())}

