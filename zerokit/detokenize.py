"""Readable text from WordPiece output (BERT, MiniLM): pieces joined, punctuation attached, and, for uncased
vocabularies, the casing put back.

`tokenizer.decode` of an uncased WordPiece model gives `# person1 # tells # person2 # that he ' s late .`:
every word lower-cased, every piece a word of its own. The source text the output was generated from (the
dialogue being summarised, the prompt) knows better, so `detokenize` learns from it, word by word (a word is a
WordPiece token with its `##` continuations):

* spacing: two words are written together when the source writes that same pair together more often than apart
  (`#` `person1` `#` -> `#Person1#`, `3` `:` `00` -> `3:00`); other pairs follow English rules (no space before
  closing punctuation, contractions `he's`, hyphenated words, paired quotes);
* casing: a word takes its most frequent spelling inside a sentence of the source (`smith` -> `Smith`,
  `person1` -> `Person1`); a word seen only at sentence starts keeps lower case unless its spelling is more
  than a capital first letter (`iPhone`); then sentences start with a capital and the pronoun is `I`.

Tokenizers that are not WordPiece (byte-level BPE, SentencePiece) decode losslessly already: `decode` as is.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

CLOSING = set(".,!?;:%)]}")
OPENING = set("([{$")
SENTENCE_END = set(".!?")
CONTRACTIONS = {"s", "t", "m", "d", "ll", "re", "ve"}  # he's don't I'm we'd we'll you're I've
TITLES = {"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "mt"}  # "Mr." does not end a sentence


def is_wordpiece(tokenizer) -> bool:
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    return type(decoder).__name__ == "WordPiece"


def lowercases(tokenizer) -> bool:
    """Whether the tokenizer folds case (an uncased vocabulary): 'A' and 'a' tokenise alike."""
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    return enc("A Zebra") == enc("a zebra")


def _words(tokenizer, ids: Sequence[int]) -> list[str]:
    """WordPiece words (continuation pieces joined, prefix dropped) of `ids`, special tokens left out."""
    prefix = tokenizer.backend_tokenizer.decoder.prefix
    special = set(tokenizer.all_special_ids)
    words: list[str] = []
    for tok in tokenizer.convert_ids_to_tokens([i for i in ids if i not in special]):
        if tok.startswith(prefix) and words:
            words[-1] += tok[len(prefix):]
        else:
            words.append(tok)
    return words


class SourceStyle:
    """What `detokenize` learns from a source text: each word's spellings (inside a sentence / at its start),
    and for each adjacent pair of words how often it is written together and apart."""

    def __init__(self, tokenizer, text: str):
        prefix = tokenizer.backend_tokenizer.decoder.prefix
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans: list[list] = []  # [word, start, end]
        for tok, (start, end) in zip(tokenizer.convert_ids_to_tokens(enc["input_ids"]), enc["offset_mapping"]):
            if tok.startswith(prefix) and spans and spans[-1][2] == start:
                spans[-1][0] += tok[len(prefix):]
                spans[-1][2] = end
            else:
                spans.append([tok, start, end])
        self.inner: dict[str, Counter] = {}
        self.initial: dict[str, Counter] = {}
        self.together, self.apart = Counter(), Counter()
        prev, before = None, (None, None)  # the previous word span, and the two words before it
        for word, start, end in spans:
            starts_sentence = prev is None or "\n" in text[prev[2]:start] or _ends_sentence(prev[0], *before)
            (self.initial if starts_sentence else self.inner).setdefault(word, Counter())[text[start:end]] += 1
            if prev is not None:
                (self.together if prev[2] == start else self.apart)[(prev[0], word)] += 1
            before, prev = ((prev[0] if prev else None), before[0]), (word, start, end)

    def glued(self, a: str, b: str) -> bool | None:
        """True/False when the source writes `a b` together/apart more often; None when it never has them side by side."""
        t, s = self.together[(a, b)], self.apart[(a, b)]
        return None if t == s == 0 else t > s

    def spelling(self, word: str) -> str | None:
        if word in self.inner:
            return self.inner[word].most_common(1)[0][0]
        if word in self.initial:
            form = self.initial[word].most_common(1)[0][0]
            return form if form != form[:1].upper() + form[1:].lower() else form.lower()
        return None


def _ends_sentence(word: str, before: str | None, two_before: str | None = None) -> bool:
    # "." after a title (Mr.) or a single letter (p.m., not McDonald's) is an abbreviation; ":" ends a speaker
    # tag (#Person1#:).
    if word == ".":
        letter = before is not None and len(before) == 1 and before.isalpha() and two_before != "'"
        return not (before in TITLES or letter)
    return word in SENTENCE_END or word == ":"


def _takes_suffix(word: str) -> bool:
    """Whether 's / 't ... attach to `word`: any word but spacing punctuation (#Person2#'s, he's, don't)."""
    return bool(word) and word not in CLOSING | OPENING | {'"', "'", "-"}


def _default_glue(words: list[str], i: int, closing_quote: list[bool]) -> bool:
    """English spacing between words[i-1] and words[i] when the source does not write them together."""
    a, b = words[i - 1], words[i]
    nxt, before = (words[i + 1] if i + 1 < len(words) else ""), (words[i - 2] if i >= 2 else "")
    if b == "'" and _takes_suffix(a) and nxt in CONTRACTIONS or a == "'" and b in CONTRACTIONS and _takes_suffix(before):
        return True
    if b == "-" and a.isalnum() and nxt.isalnum() or a == "-" and b.isalnum() and before.isalnum():
        return True
    if a in ":.," and b.isdigit() and before.isdigit():  # 3:00, 1,000, 2.5
        return True
    if b == '"':  # a closing quote hugs the word before it, an opening one the word after it
        return closing_quote[i]
    if a == '"' and not closing_quote[i - 1]:
        return True
    return b in CLOSING or a in OPENING


def detokenize(tokenizer, ids: Sequence[int], source: str | None = None) -> str:
    """`ids` (generated token ids) as text: WordPiece output spaced and, for an uncased vocabulary, cased after
    `source` (the text the output was generated from; None: English rules only). Other tokenizers: `decode`."""
    if not is_wordpiece(tokenizer):
        return tokenizer.decode(ids, skip_special_tokens=True).strip()
    words = _words(tokenizer, ids)
    style = SourceStyle(tokenizer, source) if source else None
    restore_case = lowercases(tokenizer)
    closing_quote, n_quotes = [], 0
    for word in words:
        closing_quote.append(word == '"' and n_quotes % 2 == 1)
        n_quotes += word == '"'
    out: list[str] = []
    sentence_start = True
    for i, word in enumerate(words):
        form = word
        contraction = i >= 2 and words[i - 1] == "'" and word in CONTRACTIONS and _takes_suffix(words[i - 2])
        if restore_case and not contraction:
            form = (style.spelling(word) if style else None) or ("I" if word == "i" else word)
        if form[:1].isalnum():
            if sentence_start and form[:1].isalpha():
                form = form[:1].upper() + form[1:]
            sentence_start = False
        elif word in SENTENCE_END and _ends_sentence(word, words[i - 1] if i else None, words[i - 2] if i > 1 else None):
            sentence_start = True
        if i:
            glue = bool(style and style.glued(words[i - 1], word)) or _default_glue(words, i, closing_quote)
            out.append("" if glue else " ")
        out.append(form)
    return "".join(out)
