"""zerokit.data: tokenizer training/caching, corpus packing, and the loaders' determinism contract."""
import json
import logging
from collections import Counter

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from zerokit.data import BlockLoader, corpus_texts, eval_batches, get_tokenizer, pack_corpus, read_index, token_byte_lengths
from zerokit.data import packed as packed_mod
from zerokit.errors import UsageError

UNICODE = "Naïve café — 日本語 🎭\n\n  tabs\tand  spaces\n"


@pytest.fixture(scope="module")
def corpus_file(data_dir, tmp_path_factory):
    """The first ~100 kB of tiny-shakespeare (cut at a line end), plus some non-ASCII text."""
    text = (data_dir / "tinyshakespeare" / "input.txt").read_text()
    text = text[: text.index("\n", 100_000) + 1] + UNICODE
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok(corpus_file, tmp_path_factory):
    return get_tokenizer(None, corpus_texts(corpus_file), 512, tmp_path_factory.mktemp("tokcache"))


@pytest.fixture(scope="module")
def packed(corpus_file, tok, tmp_path_factory):
    return pack_corpus(corpus_file, *tok, tmp_path_factory.mktemp("packed"))


def test_tokenizer_round_trip_auto_load_and_cache(corpus_file, tmp_path, caplog):
    texts = corpus_texts(corpus_file)
    tok_dir, tok = get_tokenizer("train", texts, 400, tmp_path)
    assert isinstance(tok, PreTrainedTokenizerFast) and len(tok) == 400
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == ("<|endoftext|>", "<|endoftext|>", "<|pad|>")
    sample = "First Citizen:\nBefore we proceed any further, hear me speak.\n" + UNICODE
    ids = tok.encode(sample, add_special_tokens=False)
    assert tok.decode(ids) == sample
    reloaded = AutoTokenizer.from_pretrained(tok_dir)
    assert reloaded.encode(sample, add_special_tokens=False) == ids
    assert reloaded.eos_token_id == tok.eos_token_id != reloaded.pad_token_id

    with caplog.at_level(logging.INFO, logger="zerokit"):
        again_dir, _ = get_tokenizer(None, texts, 400, tmp_path)
    assert again_dir == tok_dir
    assert f"tokenizer cache hit: {tok_dir}" in caplog.messages
    assert get_tokenizer(tok_dir, None, 0, tmp_path)[0] == tok_dir  # an existing directory loads as is
    assert get_tokenizer(None, texts, 300, tmp_path)[0] != tok_dir  # settings are part of the cache key


def test_token_byte_lengths_are_exact(tok):
    _, tok = tok
    lengths = token_byte_lengths(tok)
    assert lengths.shape == (len(tok),) and lengths[tok.eos_token_id] == lengths[tok.pad_token_id] == 0
    text = "To be, or not to be: that is the question.\n" + UNICODE
    ids = tok.encode(text, add_special_tokens=False)
    assert lengths[ids].sum() == len(text.encode("utf-8"))
    assert lengths[ids + [tok.eos_token_id]].sum() == len(text.encode("utf-8"))


def test_pack_corpus_counts_split_and_cache(corpus_file, tok, tmp_path, caplog, monkeypatch):
    tok_dir, tok = tok
    monkeypatch.setattr(packed_mod, "CHUNK_CHARS", 4096)  # force many pieces, tokenized on 2 threads
    out = pack_corpus(corpus_file, tok_dir, tok, tmp_path, val_fraction=0.1)
    index = read_index(out)
    train = np.memmap(out / "train.bin", dtype=np.uint16, mode="r")
    val = np.memmap(out / "val.bin", dtype=np.uint16, mode="r")
    assert index["dtype"] == "uint16" and index["version"] == packed_mod.FORMAT_VERSION
    assert (index["splits"]["train"]["tokens"], index["splits"]["val"]["tokens"]) == (len(train), len(val))

    # nanoGPT-style split: the last ~10% of the bytes, starting at a line start; nothing lost or added.
    data = corpus_file.read_bytes()
    n_train = index["splits"]["train"]["bytes"]
    assert n_train + index["splits"]["val"]["bytes"] == len(data)
    assert data[n_train - 1:n_train] == b"\n" and abs(n_train - 0.9 * len(data)) < 200
    # Piecewise parallel tokenization gives exactly the whole-text tokens; byte lengths add up.
    train_text = data[:n_train].decode()
    assert train.tolist() == tok.encode(train_text, add_special_tokens=False)
    lengths = np.load(out / "token_bytes.npy")
    assert lengths[train].sum() == n_train and lengths[val].sum() == len(data) - n_train

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    monkeypatch.setattr(packed_mod, "_tokenize", lambda *a, **k: pytest.fail("cache hit must not tokenize"))
    with caplog.at_level(logging.INFO, logger="zerokit"):
        assert pack_corpus(corpus_file, tok_dir, tok, tmp_path, val_fraction=0.1) == out
    assert f"data cache hit: {out}" in caplog.messages
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temp dirs left behind


def test_pack_document_collections(tok, tmp_path):
    tok_dir, tok = tok
    folder = tmp_path / "docs"
    folder.mkdir()
    rows = [{"dialogue": f"#Person1#: line {i}", "summary": f"summary {i}", "topic": "x"} for i in range(9)]
    (folder / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "b.txt").write_text("a whole text file is one document\n")
    out = pack_corpus(folder, tok_dir, tok, tmp_path / "out", val_fraction=0.2, text_field="dialogue,summary")
    index = read_index(out)
    assert (index["splits"]["train"]["documents"], index["splits"]["val"]["documents"]) == (8, 2)
    train = np.fromfile(out / "train.bin", dtype=np.uint16)
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    assert (train == tok.eos_token_id).sum() == 7 and (val == tok.eos_token_id).sum() == 1  # eos between documents
    assert tok.decode(val) == "#Person1#: line 8\nsummary 8<|endoftext|>a whole text file is one document\n"
    assert corpus_texts(folder, "dialogue,summary", val_fraction=0.2)[0] == "#Person1#: line 0\nsummary 0"

    with pytest.raises(UsageError, match="summ"):
        pack_corpus(folder, tok_dir, tok, tmp_path / "out", text_field="dialogue,summ")


def test_embedded_tinyshakespeare(data_dir):
    shared = (data_dir / "tinyshakespeare" / "input.txt").read_text()
    assert packed_mod.DEFAULT_CORPUS.read_text() == shared
    train = corpus_texts("tinyshakespeare")
    assert train == corpus_texts(None) and len(train) == 1 and shared.startswith(train[0])
    assert train[0].endswith("\n") and 0.89 < len(train[0]) / len(shared) < 0.91


def test_hub_dataset_source(tok, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, config, split):  # stands in for the hub (offline here)
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": [f"document {i}" for i in range(10)], "label": list(range(10))})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    out = pack_corpus("someone/corpus:small", *tok, tmp_path)
    assert calls == [("someone/corpus", "small", "train")] and out.name.startswith("someone_corpus-")
    assert read_index(out)["splits"]["val"]["documents"] == 1
    with pytest.raises(UsageError, match="no column"):
        corpus_texts("someone/corpus", text_field="body")


def test_missing_corpus_names_the_path(tok, tmp_path):
    missing = tmp_path / "no_such_corpus.txt"
    with pytest.raises(UsageError, match=str(missing)):
        pack_corpus(missing, *tok, tmp_path)
    with pytest.raises(UsageError, match="no_such_corpus"):
        corpus_texts("./no_such_corpus.jsonl")


def _windows(batches):
    """Multiset of (input row + final target) token tuples: one entry per served window."""
    return Counter(tuple(x.tolist()) + (int(y[-1]),) for b in batches for x, y in zip(b["input_ids"], b["targets"]))


def _step(packed, world, micro, accum, steps, state=None, block=32, seed=7):
    """Per step, the multiset of windows served by all ranks, and each rank's own multisets."""
    loaders = [BlockLoader(packed, "train", block, micro, accum, r, world, seed) for r in range(world)]
    if state:
        for loader in loaders:
            loader.load_state_dict(state)
    per_step = []
    for _ in range(steps):
        per_rank = [_windows(loader.next_window()) for loader in loaders]
        per_step.append((sum(per_rank, Counter()), per_rank))
    return per_step, loaders[0].state_dict()


def test_loader_global_batch_independent_of_split(packed):
    reference, _ = _step(packed, world=1, micro=4, accum=2, steps=3)
    for world, micro, accum in [(2, 2, 2), (4, 2, 1), (4, 1, 2)]:
        steps, _ = _step(packed, world, micro, accum, steps=3)
        for (union, per_rank), (ref, _) in zip(steps, reference):
            assert union == ref and sum(ref.values()) == 8
            assert all(not (set(a) & set(b)) for i, a in enumerate(per_rank) for b in per_rank[i + 1:])

    batch = BlockLoader(packed, block_size=32, micro_batch_size=3).next_window()[0]
    assert batch["input_ids"].shape == (3, 32) and batch["input_ids"].dtype == torch.int64
    assert torch.equal(batch["input_ids"][:, 1:], batch["targets"][:, :-1])


def test_loader_epochs_cover_windows_with_new_boundaries(packed):
    loader = BlockLoader(packed, block_size=32, micro_batch_size=4, seed=3)
    n = loader.windows_per_epoch
    for epoch in (0, 1):
        starts = np.sort(loader._starts(np.arange(epoch * n, (epoch + 1) * n)))
        offset = starts[0]
        assert 0 <= offset < 32 and np.array_equal(starts, offset + 32 * np.arange(n))
        assert starts[-1] + 33 <= len(loader.tokens)
    assert loader._starts(np.array([0]))[0] % 32 != loader._starts(np.array([n]))[0] % 32  # seed 3: offsets differ


def test_loader_resume_same_and_different_world_size(packed):
    steps, state = _step(packed, world=1, micro=4, accum=2, steps=5)
    assert state["samples_seen"] == 40 and state["seed"] == 7
    straight, _ = _step(packed, world=1, micro=4, accum=2, steps=8)
    assert [s[0] for s in straight[:5]] == [s[0] for s in steps]
    for world, micro, accum in [(1, 4, 2), (2, 2, 2), (4, 1, 2)]:
        resumed, _ = _step(packed, world, micro, accum, steps=3, state=state)
        assert [s[0] for s in resumed] == [s[0] for s in straight[5:]]

    # Across an epoch boundary too (the step's samples come from two epochs).
    edge = dict(state, samples_seen=BlockLoader(packed, block_size=32).windows_per_epoch - 3)
    one, _ = _step(packed, world=1, micro=4, accum=2, steps=2, state=edge)
    two, _ = _step(packed, world=2, micro=1, accum=4, steps=2, state=edge)
    assert [s[0] for s in one] == [s[0] for s in two]
    with pytest.raises(UsageError, match="block_size"):
        BlockLoader(packed, block_size=16).load_state_dict(state)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_batches_cover_val_evenly(packed, world):
    val = np.memmap(packed / "val.bin", dtype=np.uint16, mode="r")
    lengths = np.load(packed / "token_bytes.npy")
    block, micro = 64, 4
    n_windows = (len(val) - 1) // block
    per_rank = [list(eval_batches(packed, "val", block, micro, r, world)) for r in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1  # same count on every rank: no collective hangs

    served = [tuple(x.tolist()) for batches in per_rank for b in batches if b["weight"] for x in b["input_ids"]]
    expected = [tuple(val[i * block:(i + 1) * block].tolist()) for i in range(n_windows)]
    assert sorted(served) == sorted(expected)
    total_bytes = sum(b["target_bytes"] for batches in per_rank for b in batches)
    assert total_bytes == lengths[val[1:n_windows * block + 1]].sum()
    assert all(b["target_bytes"] == 0 for batches in per_rank for b in batches if not b["weight"])
    if world == 1:  # in order
        assert served == expected
    assert len(list(eval_batches(packed, "val", block, micro, 0, world, max_batches=2))) == 2


def test_eval_batches_pad_short_ranks(packed):
    block = 256
    n_windows = (len(np.memmap(packed / "val.bin", dtype=np.uint16, mode="r")) - 1) // block
    world = n_windows - 1  # rank 0 gets 2 windows, the others 1: they need a zero-weight padding batch
    per_rank = [list(eval_batches(packed, "val", block, 1, r, world)) for r in range(world)]
    assert [len(b) for b in per_rank] == [2] * world
    assert [b[1]["weight"] for b in per_rank] == [1] + [0] * (world - 1)
    assert per_rank[1][1]["target_bytes"] == 0 and per_rank[1][1]["input_ids"].shape == (1, block)


# ------------------------------------------------------------------ the loader on a prepared (sharded) directory

class CountingTokens:
    """A token array that records every index read through it (what a rank's loader touches)."""

    def __init__(self, tokens):
        self.tokens, self.reads = tokens, []

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, idx):
        self.reads.append(np.asarray(idx).ravel().copy())
        return self.tokens[idx]

    def indices(self) -> np.ndarray:
        return np.concatenate(self.reads) if self.reads else np.empty(0, dtype=np.int64)


@pytest.fixture(scope="module")
def prepared(data_dir, tmp_path_factory):
    """tiny-shakespeare's first 120 kB as ~900 JSONL documents, prepared into ~40 shards of 2,000 tokens."""
    from zerokit.data.prepare import prepare
    work = tmp_path_factory.mktemp("prepared")
    text = (data_dir / "tinyshakespeare" / "input.txt").read_text()[:120_000]
    (work / "src.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in text.split("\n\n")))
    return prepare(str(work / "src.jsonl"), work / "out", workers=0, vocab_size=300, shard_tokens=2000, val_fraction=0.1)


def _shard_tokens(prepared, split):
    """The split's shards read straight from their files, concatenated: the reference token stream."""
    shards = read_index(prepared)["splits"][split]["shards"]
    return np.concatenate([np.fromfile(prepared / s["file"], dtype=np.uint16) for s in shards])


def _stream_starts(n_tokens, block, seed, samples):
    """Window start of each global sample, from BlockLoader's documented contract (not its code)."""
    n = (n_tokens - block) // block
    epochs = {}
    for e in {g // n for g in samples}:
        rng = np.random.default_rng([seed, e])
        epochs[e] = (int(rng.integers(block)), rng.permutation(n))
    return np.array([epochs[g // n][0] + epochs[g // n][1][g % n] * block for g in samples])


def _counted(prepared, world, micro, accum, state=None, block=32, seed=5):
    loaders = []
    for r in range(world):
        loader = BlockLoader(prepared, "train", block, micro, accum, r, world, seed)
        loader.tokens = CountingTokens(loader.tokens)
        if state:
            loader.load_state_dict(state)
        loaders.append(loader)
    return loaders


def test_prepared_ranks_read_only_their_windows(prepared):
    block, world, micro, accum, steps, seed = 32, 4, 2, 2, 5, 5
    reference = _shard_tokens(prepared, "train")
    loaders = _counted(prepared, world, micro, accum, block=block, seed=seed)
    assert len(reference) == len(loaders[0].tokens) > 40 * 1000  # dozens of shards; windows cross their boundaries
    assert all(not loader.tokens.reads for loader in loaders)  # opening reads nothing
    served = [[] for _ in range(world)]
    for _ in range(steps):
        for r, loader in enumerate(loaders):
            served[r].extend(loader.next_window())
    window = np.arange(block + 1)
    read_sets = []
    for r, loader in enumerate(loaders):
        # rank r's micro-batch k of step s holds global samples s*G + (k*world + r)*B + [0, B)
        samples = [s * world * micro * accum + (k * world + r) * micro + j
                   for s in range(steps) for k in range(accum) for j in range(micro)]
        starts = _stream_starts(len(reference), block, seed, samples)
        read = loader.tokens.indices()
        assert np.array_equal(np.sort(read), np.sort((starts[:, None] + window).ravel()))  # exactly its windows
        rows = torch.cat([torch.cat([b["input_ids"], b["targets"][:, -1:]], 1) for b in served[r]])
        assert np.array_equal(rows.numpy(), reference[starts[:, None] + window])  # the right tokens, across shards
        read_sets.append(set(read.tolist()))
    consumed = steps * world * micro * accum * (block + 1)
    for r, mine in enumerate(read_sets):
        assert len(loaders[r].tokens.indices()) == consumed // world  # 1/world of what the step consumed
        for other in read_sets[r + 1:]:
            assert len(mine & other) <= 2 * steps * micro * accum  # windows share at most their end tokens
    assert len(set().union(*read_sets)) < len(reference) / 3  # nobody swept the corpus


def test_prepared_resume_at_other_world_sizes_continues_the_stream(prepared):
    def run(loaders, steps):
        per_step = []
        for _ in range(steps):
            for loader in loaders:
                loader.tokens.reads.clear()
                loader.next_window()
            per_step.append(np.sort(np.concatenate([loader.tokens.indices() for loader in loaders])))
        return per_step, loaders[0].state_dict()

    straight, _ = run(_counted(prepared, 1, 4, 3), 7)  # global batch 12 on one rank
    first, state = run(_counted(prepared, 2, 3, 2), 3)  # 12 = 2 ranks x 3 x 2
    assert all(np.array_equal(a, b) for a, b in zip(first, straight[:3]))
    for world, micro, accum in [(3, 2, 2), (4, 3, 1), (6, 1, 2)]:
        resumed, _ = run(_counted(prepared, world, micro, accum, state=state), 4)
        assert all(np.array_equal(a, b) for a, b in zip(resumed, straight[3:]))


def test_epochs_reshuffle_deterministically_and_differently(prepared):
    block, seed = 32, 5
    a, b = BlockLoader(prepared, block_size=block, seed=seed), BlockLoader(prepared, block_size=block, seed=seed)
    n = a.windows_per_epoch
    epochs = [a._starts(np.arange(e * n, (e + 1) * n)) for e in range(3)]
    for e, starts in enumerate(epochs):
        assert np.array_equal(starts, b._starts(np.arange(e * n, (e + 1) * n)))  # another process agrees
        assert np.array_equal(starts, _stream_starts(len(a.tokens), block, seed, range(e * n, (e + 1) * n)))
        offset = starts.min()
        assert np.array_equal(np.sort(starts), offset + block * np.arange(n))  # each window once an epoch
    orders = [np.argsort(s) for s in epochs]
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])  # new order
    assert len({int(s.min()) for s in epochs}) > 1  # and new boundaries
    other = BlockLoader(prepared, block_size=block, seed=seed + 1)._starts(np.arange(n))
    assert not np.array_equal(other, epochs[0])


def test_prepared_truncated_shard_is_named(prepared, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    shard = copy / read_index(copy)["splits"]["train"]["shards"][3]["file"]
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size - 2)
    with pytest.raises(UsageError, match=f"{shard.name}.*prepare the corpus again"):
        BlockLoader(copy, block_size=32)


# ------------------------------------------------------------------ the recipe's raw corpus: packer or zerokit prepare

def _data_cfg(corpus, **over):
    from zerokit.config import Config
    return Config(**{"corpus": str(corpus), "text_field": "text", "tokenizer": "train", "vocab_size": 300,
                     "val_fraction": 0.1, "prepare": "auto", **over})


def test_which_corpora_go_through_prepare(tmp_path):
    from zerokit.pretraining import PREPARE_MIN_MB, wants_prepare
    text = tmp_path / "one.txt"
    text.write_text("a text\n" * 100)
    small = tmp_path / "small"
    small.mkdir()
    (small / "a.jsonl").write_text('{"text": "x"}\n' * 10)
    (small / "b.txt").write_text("y")
    assert not wants_prepare(_data_cfg(text)) and not wants_prepare(_data_cfg("tinyshakespeare"))  # one document
    assert not wants_prepare(_data_cfg(small)) and wants_prepare(_data_cfg(small, prepare="always"))
    assert wants_prepare(_data_cfg("someone/corpus")) and wants_prepare(_data_cfg(f"{small}/*.jsonl"))
    assert not wants_prepare(_data_cfg("someone/corpus", prepare="never"))
    (small / "c.jsonl.gz").write_bytes(b"")  # a format only prepare reads
    assert wants_prepare(_data_cfg(small))
    (small / "c.jsonl.gz").unlink()
    with (small / "big.jsonl").open("wb") as f:  # sparse: its size is all that is looked at
        f.truncate(PREPARE_MIN_MB * 10**6)
    assert wants_prepare(_data_cfg(small))
    with pytest.raises(UsageError, match="one .txt file, one document"):
        wants_prepare(_data_cfg(text, prepare="always"))


def test_recipe_prepares_a_collection_once_into_the_cache(data_dir, tmp_path, caplog):
    import gzip
    from zerokit.data.prepare import is_prepared
    from zerokit.pretraining import prepare_data
    paragraphs = (data_dir / "tinyshakespeare" / "input.txt").read_text()[:60_000].split("\n\n")
    folder = tmp_path / "corpus"
    folder.mkdir()
    half = len(paragraphs) // 2
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs[:half]))
    with gzip.open(folder / "b.jsonl.gz", "wt") as f:  # the in-memory packer cannot read this one
        f.write("".join(json.dumps({"text": p}) + "\n" for p in paragraphs[half:]))
    cache = tmp_path / "cache"
    tok, out = prepare_data(_data_cfg(folder), cache)
    assert is_prepared(out) and out.parent == cache / "corpora"
    manifest = read_index(out)
    assert manifest["documents"] == len(paragraphs) and manifest["val_fraction"] == 0.1
    # validation holds whole documents: its tokens split at eos decode to source paragraphs, ~10% of them
    val = _shard_tokens(out, "val")
    docs = [tok.decode(d) for d in np.split(val, np.flatnonzero(val == tok.eos_token_id) + 1) if len(d)]
    docs = [d.removesuffix(tok.eos_token) for d in docs]
    assert set(docs) <= set(paragraphs) and abs(len(docs) - 0.1 * len(paragraphs)) <= 2
    batch = BlockLoader(out, block_size=32, micro_batch_size=2).next_window()[0]
    assert batch["input_ids"].shape == (2, 32)

    stamp = (out / "manifest.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="zerokit"):
        assert prepare_data(_data_cfg(folder), cache)[1] == out  # another rank, or a rerun: a cache hit
    assert f"prepared corpus cache hit: {out}" in caplog.messages and (out / "manifest.json").stat().st_mtime_ns == stamp
    with (folder / "a.jsonl").open("a") as f:
        f.write(json.dumps({"text": "A NEW DOCUMENT."}) + "\n")
    assert prepare_data(_data_cfg(folder), cache)[1] != out  # a changed source is prepared anew


# ------------------------------------------------------------------ corpora too large for an explicit epoch order

def test_index_permutation_is_a_seeded_bijection():
    from zerokit.data.permute import IndexPermutation
    for n in (1, 2, 3, 5, 1000, 4097, 1 << 16):
        perm = IndexPermutation(n, np.random.default_rng([9, 0]))[np.arange(n)]
        assert np.array_equal(np.sort(perm), np.arange(n))  # every index once
        again = IndexPermutation(n, np.random.default_rng([9, 0]))[np.arange(n)[::-1]]
        assert np.array_equal(again, perm[::-1])  # a function of the seed only, at any index order
    other = IndexPermutation(n, np.random.default_rng([9, 1]))[np.arange(n)]
    assert (other == perm).mean() < 0.01
    assert (perm == np.arange(n)).mean() < 0.01 and abs(np.corrcoef(perm, np.arange(n))[0, 1]) < 0.02  # well mixed


def test_loader_at_scale_reads_only_its_windows(tmp_path):
    """4.3 billion tokens in two sparse 4 GB shards (no disk used): the epoch order is not materialised,
    and each of 4 ranks reads exactly its own windows, resumably at another world size."""
    from zerokit.data.permute import IndexPermutation
    n_shard = 1 << 31
    shards = []
    for i in range(2):
        with open(tmp_path / f"train_{i:05d}.bin", "wb") as f:
            f.truncate(n_shard * 2)
        shards.append({"file": f"train_{i:05d}.bin", "tokens": n_shard, "sha256": "not read"})
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "zerokit-prepared", "dtype": "uint16",
                                                        "splits": {"train": {"shards": shards}}}))
    block, micro, steps = 128, 4, 3
    loaders = _counted(tmp_path, 4, micro, 1, block=block)
    assert loaders[0].windows_per_epoch == (2 * n_shard - block) // block > packed_mod.EXPLICIT_ORDER_MAX
    for _ in range(steps):
        for loader in loaders:
            loader.next_window()
    assert all(isinstance(loader._epochs[0][1], IndexPermutation) for loader in loaders)
    reads = [loader.tokens.indices() for loader in loaders]
    starts = [set(r[::block + 1].tolist()) for r in reads]
    assert all(len(r) == steps * micro * (block + 1) for r in reads) and len(set().union(*starts)) == 4 * steps * micro
    assert all(np.array_equal(r.reshape(-1, block + 1), r[::block + 1, None] + np.arange(block + 1)) for r in reads)
    assert len({int(s) // n_shard for r in reads for s in r}) == 2  # from both shards

    state = loaders[0].state_dict()
    two = _counted(tmp_path, 2, 2 * micro, 1, state=state, block=block)
    for loader in two:
        loader.next_window()
    four = _counted(tmp_path, 4, micro, 1, state=state, block=block)
    for loader in four:
        loader.next_window()
    assert np.array_equal(np.sort(np.concatenate([x.tokens.indices() for x in two])),
                          np.sort(np.concatenate([x.tokens.indices() for x in four])))
