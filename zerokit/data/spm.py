"""SentencePiece tokenizers (BPE or unigram), trained with the sentencepiece library and served as a
Hugging Face fast tokenizer (`AutoTokenizer.from_pretrained(dir)` loads it; no sentencepiece at run time).

Settings chosen so that bits per byte is exact: byte fallback (any text encodes, a byte piece `<0xNN>` is one
byte), no normalisation (identity: the tokens spell the original text), no dummy prefix and spaces kept as
they are (each `▁` stands for exactly one space byte), digits split into single-digit pieces. So the bytes of
a token sequence are the sum of its pieces' bytes, with `▁` counted as 1 (zerokit.data.tokenizer.token_byte_lengths).
One caveat: a literal `▁` (U+2581) in the text reads back as a space, so it counts 1 byte, not 3.
"""
from __future__ import annotations

import io

from zerokit.errors import UsageError

KINDS = {"sentencepiece_bpe": "bpe", "sentencepiece_unigram": "unigram"}
UNK = "<unk>"
MIN_VOCAB = 256 + 64  # the 256 byte pieces, unk, the 2 special tokens, and some merges


def _lines(texts: list[str]):
    """SentencePiece trains on lines (it cannot hold a newline); newlines then encode as the byte <0x0A>."""
    for t in texts:
        for line in t.split("\n"):
            if line:
                yield line


def train_sentencepiece(texts: list[str], vocab_size: int, kind: str, eos: str, pad: str):
    """A PreTrainedTokenizerFast with `vocab_size` ids (the last two are eos and pad) trained on `texts`."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import import_protobuf

    if vocab_size < MIN_VOCAB:
        raise UsageError(f"vocab_size={vocab_size} is too small for {kind} (256 byte pieces come first); use at least {MIN_VOCAB}")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(texts), model_writer=model, vocab_size=vocab_size - 2, model_type=KINDS[kind],
            byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_by_whitespace=True,
            character_coverage=0.9995, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, max_sentence_length=1 << 16,
            num_threads=1,  # one thread: the same pieces on every run (resume gives byte-identical shards)
            minloglevel=2)
    except RuntimeError as e:  # e.g. "Vocabulary size is too high" for a small sample
        raise UsageError(f"SentencePiece training failed ({e}); use a larger tokenizer sample or a smaller vocab_size") from e
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(model.getvalue())
    pieces = [(p.piece, p.score) for p in proto.pieces]
    if KINDS[kind] == "unigram":
        core = models.Unigram(pieces, unk_id=0, byte_fallback=True)
    else:
        from transformers.tokenization_utils_base import generate_merges
        vocab = {p: i for i, (p, _) in enumerate(pieces)}
        core = models.BPE(vocab, generate_merges(vocab, {p: s for p, s in pieces}), unk_token=UNK,
                          byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(core)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
        pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([UNK, eos, pad])  # unk keeps id 0; eos and pad follow the pieces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK, bos_token=eos, eos_token=eos, pad_token=pad)


def is_exact_sentencepiece(backend_json: dict) -> bool:
    """True for a tokenizer laid out as above (no normaliser, Metaspace without a prefix), whose piece byte
    counts add up to the text's bytes exactly."""
    if backend_json.get("normalizer") is not None:
        return False
    pre = backend_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    metas = [p for p in parts if p.get("type") == "Metaspace"]
    return len(metas) == 1 and metas[0].get("prepend_scheme") == "never"
