"""Data: tokenizer training/loading, corpus packing into token shards, and the training / eval loaders."""
from zerokit.data.packed import BlockLoader, corpus_texts, eval_batches, pack_corpus, read_index
from zerokit.data.tokenizer import get_tokenizer, token_byte_lengths, tokenizer_hash, train_tokenizer

__all__ = [
    "BlockLoader", "corpus_texts", "eval_batches", "get_tokenizer", "pack_corpus", "read_index",
    "token_byte_lengths", "tokenizer_hash", "train_tokenizer",
]
