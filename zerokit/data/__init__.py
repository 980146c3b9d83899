"""Data: tokenizer training/loading, corpus packing into token shards, and the training / eval loaders.

The names load on first use (PEP 562): `zerokit prepare`'s worker processes import zerokit.data.* modules
and must not pay for torch and transformers, which packed and tokenizer import."""
import importlib

_WHERE = {"BlockLoader": "packed", "corpus_texts": "packed", "eval_batches": "packed", "pack_corpus": "packed",
          "read_index": "packed", "get_tokenizer": "tokenizer", "token_byte_lengths": "tokenizer",
          "tokenizer_hash": "tokenizer", "train_tokenizer": "tokenizer"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'zerokit.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"zerokit.data.{_WHERE[name]}"), name)
