"""Tokenizers: train one once per corpus (cached): byte-level BPE, or SentencePiece BPE / unigram
(zerokit.data.spm); or load an existing one.

A trained tokenizer is saved as a Hugging Face tokenizer directory, so anything downstream
(`AutoTokenizer.from_pretrained(dir)`, checkpoints, generation) treats it like a hub tokenizer.
The cache key is the sha256 of the corpus content plus the settings, so re-running a recipe
on the same data reuses the directory instead of re-training.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from zerokit.data.spm import KINDS as SP_KINDS
from zerokit.errors import UsageError

if TYPE_CHECKING:  # transformers is imported where it is used: `zerokit prepare` with a given tokenizer never needs it
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

log = logging.getLogger("zerokit")

EOS = "<|endoftext|>"  # GPT-2 convention: also the bos token, and the document separator when packing
PAD = "<|pad|>"  # distinct from eos, so masking pad labels never masks real document ends
KIND = "byte-bpe"
# data.tokenizer values that train a tokenizer on the corpus: "train" is byte-level BPE
TRAIN_KINDS = {"train": KIND, **{name: f"sp-{kind}" for name, kind in SP_KINDS.items()}}
_CACHE_VERSION = 1  # bump when training settings change, to invalidate old cache entries


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _read_texts(corpus: Iterable[str | os.PathLike]) -> list[str]:
    """Texts as strings; path objects (not plain str, which is always text) are read as UTF-8 files."""
    texts = []
    for item in corpus:
        if isinstance(item, os.PathLike):
            path = Path(item)
            if not path.is_file():
                raise UsageError(f"tokenizer corpus file not found: {path}; pass existing text files or strings")
            item = path.read_text(encoding="utf-8")
        texts.append(item)
    return texts


def take_sample(texts: Iterable[str], mb: float | None) -> list[str]:
    """The first `mb` megabytes (characters / 1e6) of `texts`, the last one cut to fit; all with mb None.
    Consumes `texts` only as far as it needs (a stream stops there)."""
    sample, size = [], 0
    for t in texts:
        if mb is not None and size >= mb * 1e6:
            break
        sample.append(t if mb is None else t[:int(mb * 1e6 - size)])
        size += len(sample[-1])
    return sample


def train_tokenizer(corpus: Iterable[str | os.PathLike], vocab_size: int, cache_root: Path, kind: str = "train") -> Path:
    """Train (or reuse from cache) a tokenizer of `kind` (a TRAIN_KINDS key) on `corpus`; returns its directory."""
    if kind not in TRAIN_KINDS:
        raise UsageError(f"unknown tokenizer kind {kind!r}; use one of {', '.join(TRAIN_KINDS)}")
    if vocab_size < 256 + 2:
        raise UsageError(f"vocab_size={vocab_size} is too small for byte-level BPE; use at least 258 (256 bytes + 2 special tokens)")
    texts = _read_texts(corpus)
    if not any(texts):
        raise UsageError("tokenizer corpus is empty; pass a corpus with some text (e.g. source 'tinyshakespeare')")
    short = TRAIN_KINDS[kind]
    h = hashlib.sha256(json.dumps({"vocab_size": vocab_size, "kind": short, "version": _CACHE_VERSION}).encode())
    n_bytes = 0
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))  # length prefix: ["ab","c"] and ["a","bc"] hash differently
        h.update(b)
        n_bytes += len(b)
    cache_root = Path(cache_root)
    final = cache_root / f"tokenizer-{short}{vocab_size}-{h.hexdigest()[:16]}"
    if (final / "tokenizer.json").is_file():
        log.info("tokenizer cache hit: %s", final)
        return final
    if kind == "train":
        hf = _train_byte_bpe(texts, vocab_size)
    else:
        from zerokit.data.spm import train_sentencepiece
        hf = train_sentencepiece(texts, vocab_size, kind, EOS, PAD)

    # Write to a temp dir and rename, so a crash or a concurrent rank never leaves a half-written cache entry.
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_root, prefix=".tmp-tokenizer-"))
    hf.save_pretrained(tmp)
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished the same entry first; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("trained tokenizer (%s, vocab %d) on %d bytes: %s", short, len(hf), n_bytes, final)
    return final


def _train_byte_bpe(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes, no unk
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD)


def get_tokenizer(
    spec: str | Path | None,
    corpus_texts: Iterable[str] | None,
    vocab_size: int,
    cache_root: Path,
) -> tuple[str, PreTrainedTokenizerBase]:
    """Resolve a tokenizer spec to (directory or hub name, tokenizer).

    spec None or "train": train a byte-level BPE on `corpus_texts` (cached under `cache_root`);
    "sentencepiece_bpe" / "sentencepiece_unigram": train that SentencePiece kind the same way;
    an existing directory: load it; anything else: a hub name (needs network access).
    """
    path = Path(spec).expanduser() if spec is not None else None
    if path is None or str(spec) in TRAIN_KINDS:
        if corpus_texts is None:
            raise UsageError(f"tokenizer '{spec}' needs a corpus; pass corpus texts or name an existing tokenizer directory")
        name = str(train_tokenizer(corpus_texts, vocab_size, cache_root, str(spec or "train")))
    elif path.is_dir():
        name = str(path)
    elif path.is_absolute() or str(spec).startswith((".", "~")):
        raise UsageError(f"tokenizer directory not found: {spec}; pass an existing directory, a hub name, or 'train'")
    else:
        name = str(spec)  # a hub name such as "gpt2"
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as e:  # hub names fail offline with OSError
        raise UsageError(
            f"could not load tokenizer {name!r} ({e.__class__.__name__}); offline machines need a local tokenizer "
            "directory or 'train' to train one on the corpus"
        ) from e
    return name, tokenizer


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the tokenizer's full definition (vocab, merges, normalisation, special tokens)."""
    if not tokenizer.is_fast:
        raise UsageError(f"{type(tokenizer).__name__} is a slow tokenizer; zerokit needs a fast one (AutoTokenizer use_fast=True)")
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def token_byte_lengths(tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """UTF-8 byte length of each token id, for bits-per-byte (special tokens count 0 bytes).

    Exact for byte-level BPE (GPT-2 style, and tokenizers trained here): each vocab character stands for
    one byte; and for the SentencePiece tokenizers trained here (zerokit.data.spm: '▁' is one space byte,
    '<0xNN>' one byte, no normaliser or dummy prefix). Other vocabularies (hub SentencePiece) get that
    count as an approximation and a warning, since their normalisation and prefix space change the bytes.
    """
    from zerokit.data.spm import is_exact_sentencepiece
    lengths = np.zeros(len(tokenizer), dtype=np.int64)
    added = tokenizer.added_tokens_decoder  # id -> AddedToken; their content is raw text, not byte-mapped
    vocab = {t: i for t, i in tokenizer.get_vocab().items() if i not in added}
    byte_chars = set(bytes_to_unicode().values())
    if all(c in byte_chars for t in vocab for c in t):
        for t, i in vocab.items():
            lengths[i] = len(t)
    else:
        if not is_exact_sentencepiece(json.loads(tokenizer.backend_tokenizer.to_str())):
            log.warning("token_byte_lengths: %s is not byte-level BPE; byte counts (bits per byte) are approximate",
                        type(tokenizer).__name__)
        for t, i in vocab.items():
            is_byte = len(t) == 6 and t.startswith("<0x") and t.endswith(">")
            lengths[i] = 1 if is_byte else len(t.replace("▁", " ").encode())
    for i, tok in added.items():
        lengths[i] = 0 if tok.special else len(tok.content.encode())
    return lengths
