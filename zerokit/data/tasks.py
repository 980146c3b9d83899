"""Fine-tuning tasks by name, and what a task gives the training loop (the loop knows nothing about the data):

* `train_batches(micro_batch_size, grad_accum, rank, world_size, seed)` -> a `TaskBatches` (data/batches.py:
  the deterministic, resumable iterator of each step's micro-batches);
* `loss(model, batch)` -> (summed loss, its target count); the loop divides by the window's target count,
  counted from each batch's `targets` or `labels` (-100: no target);
* `evaluate(model, rank, world_size)` -> a dict of metrics, the same on every rank.

The tasks: `SentimentTask` (data/sentiment.py) and `SummarizationTask` (data/summarization.py); their records
are read by data/records.py. The names below are the package's public face for tasks.
"""
from __future__ import annotations

from zerokit.data.batches import IGNORE_INDEX, TaskBatches, pad, shard_batches
from zerokit.data.records import load_records
from zerokit.data.sentiment import SentimentTask
from zerokit.data.summarization import SummarizationTask, rouge_scores, rouge_sums
from zerokit.errors import UsageError

__all__ = ["IGNORE_INDEX", "TASKS", "SentimentTask", "SummarizationTask", "TaskBatches", "build_task", "load_records",
           "pad", "rouge_scores", "rouge_sums", "shard_batches"]

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
