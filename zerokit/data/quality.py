"""Quality filters and duplicate removal for `zerokit prepare`, with datatrove's steps (FineWeb's own).

Filters, in FineWeb's order, each switchable: gopher_repetition, gopher_quality, c4 (C4's line filter as
FineWeb ran it: terminal punctuation not required; it rewrites the text, dropping bad lines), fineweb.
Dedup: exact (identical text after the filters) and minhash (datatrove's MinHash signatures: 5-gram
shingles, 14 bands of 8 hashes, so documents with Jaccard similarity >= ~0.8 are caught with p >= 0.92).

Language identification is not offered: datatrove's LanguageFilter downloads its fastText model at run
time, which machines without network access cannot do.

Words are split by a regex, not datatrove's default spaCy tokenizer: the same word and sentence counts on
ordinary English within the filters' thresholds, and ~15x faster (spaCy made the filters ~60 kB/s a core).
"""
from __future__ import annotations

import hashlib
import re

import numpy as np

from zerokit.errors import UsageError

FILTERS = ("gopher_repetition", "gopher_quality", "c4", "fineweb")
DEDUP = ("exact", "minhash")
REWRITES = ("c4",)  # filters that change the text they keep: a second pass must run them again
BANDS = 14
KEPT = 0  # status of a kept document; step k of steps() removed those with status k + 1

_WORD = re.compile(r"\w+(?:'\w+)*|[^\w\s]")
_SENTENCE = re.compile(r"\S[^.!?\n]*(?:[.!?]+|$)", re.M)


def parse(names: str | list | None, allowed: tuple, what: str) -> list[str]:
    """A comma list (or list) of step names, checked, in the canonical order."""
    if names in (None, "", "none"):
        return []
    chosen = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    if "all" in chosen:
        return list(allowed)
    bad = [n for n in chosen if n not in allowed]
    if bad:
        raise UsageError(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)} (comma list, or all)")
    return [n for n in allowed if n in chosen]


def steps(filters: list[str], dedup: list[str]) -> list[str]:
    """Every removal step in the order it runs: the filters, then exact, then near-duplicate removal."""
    return list(filters) + list(dedup)


def _word_tokenizer():
    from datatrove.utils.word_tokenizers import WordTokenizer

    class RegexWords(WordTokenizer):
        def __init__(self):
            super().__init__("en")

        def word_tokenize(self, text):
            return _WORD.findall(text)

        def sent_tokenize(self, text):
            return [m.group().strip() for m in _SENTENCE.finditer(text)]

        def span_tokenize(self, text):
            return [m.span() for m in _SENTENCE.finditer(text)]
    return RegexWords()


def _build_filters(names: list[str]) -> list:
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter)
    words = _word_tokenizer()
    make = {"gopher_repetition": lambda: GopherRepetitionFilter(language=words),
            "gopher_quality": lambda: GopherQualityFilter(language=words),
            "c4": lambda: C4QualityFilter(filter_no_terminal_punct=False, language=words),
            "fineweb": lambda: FineWebQualityFilter(language=words)}
    return [make[n]() for n in names]


def hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class Cleaner:
    """Runs in each worker: the filters, then the dedup keys of what they keep."""

    def __init__(self, filters: list[str], dedup: list[str]):
        from datatrove.data import Document
        self._doc = Document
        self.names, self.filters = filters, _build_filters(filters)
        self.minhash = None
        if "minhash" in dedup:
            from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
            from datatrove.utils.hashing import HashConfig
            # sha1, not datatrove's default xxhash: its xxhash call passes str, which xxhash 4 refuses
            config = MinhashConfig(num_buckets=BANDS, hash_config=HashConfig(hash_fc="sha1", precision=64))
            self.minhash = MinhashDedupSignature("/nonexistent", config=config, language=_word_tokenizer())

    def clean(self, text: str, only_rewrites: bool = False) -> tuple[int, str]:
        """(status, text as kept); only_rewrites runs just the filters that change the text (the second pass)."""
        doc = self._doc(text=text, id="0")
        for k, (name, f) in enumerate(zip(self.names, self.filters)):
            if only_rewrites and name not in REWRITES:
                continue
            res = f.filter(doc)
            if not (res if isinstance(res, bool) else res[0]):
                return k + 1, doc.text
        return KEPT, doc.text

    def keys(self, text: str) -> tuple[int, np.ndarray]:
        """(exact-text hash, one 64-bit key per MinHash band; zeros without minhash)."""
        bands = np.zeros(BANDS, dtype=np.uint64)
        if self.minhash is not None:
            shingles = self.minhash.get_shingles(text)
            if len(shingles):  # fewer words than one n-gram: no signature, never a near duplicate
                for b, sig in enumerate(self.minhash.get_signature(shingles)):
                    bands[b] = hash64(np.asarray(sig, dtype=np.uint64).tobytes()) | 1  # 0 means none
        return hash64(text.encode("utf-8")), bands


def _first_of_groups(keys: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(member, first member) pairs linking each valid index to the lowest index holding the same key."""
    idx = np.flatnonzero(valid)
    order = idx[np.argsort(keys[idx], kind="stable")]  # stable: equal keys stay in document order
    k = keys[order]
    starts = np.r_[True, k[1:] != k[:-1]]
    first = order[np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))]
    dup = ~starts
    return order[dup], first[dup]


def resolve_exact(status: np.ndarray, exact: np.ndarray, step: int) -> None:
    """Mark every kept document whose text an earlier kept document has (status -> step)."""
    members, _ = _first_of_groups(exact, status == KEPT)
    status[members] = step


def resolve_minhash(status: np.ndarray, bands: np.ndarray, step: int) -> None:
    """Near-duplicate clusters (documents sharing any band key, transitively) keep their first document,
    as datatrove's MinHash stages 3-4 do. Holds about 32 bytes a document: one band's keys at a time."""
    labels = np.arange(len(status))
    pairs = []
    for b in range(bands.shape[1]):
        col = np.asarray(bands[:, b])
        pairs.append(_first_of_groups(col, (status == KEPT) & (col != 0)))
    a = np.concatenate([p[0] for p in pairs]) if pairs else np.zeros(0, int)
    f = np.concatenate([p[1] for p in pairs]) if pairs else np.zeros(0, int)
    while len(a):  # min-label propagation over the edges until every component has one label
        before = labels.copy()
        low = np.minimum(labels[a], labels[f])
        np.minimum.at(labels, a, low)
        np.minimum.at(labels, f, low)
        labels = labels[labels]  # pointer jumping: follow labels to their roots
        if np.array_equal(labels, before):
            break
    removed = (status == KEPT) & (labels != np.arange(len(status)))
    status[removed] = step
