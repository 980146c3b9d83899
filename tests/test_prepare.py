"""`zerokit prepare`: planted duplicates and junk are removed at the planted counts, token shards are
fixed-size, checksummed and byte-exact for every tokenizer kind, a SIGKILLed run resumes to the same
bytes, and the pre-training recipe trains on a prepared directory."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

import prepare_corpus
from launch_util import env, metrics, pretrain
from zerokit.data.prepare import prepare
from zerokit.data.shards import ShardedTokens

ALL = dict(filters="all", dedup="exact,minhash")


def _shards(out: Path, split: str) -> np.ndarray:
    m = json.loads((out / "manifest.json").read_text())
    return ShardedTokens(out, m["splits"][split]["shards"], m["dtype"])[np.arange(m["splits"][split]["tokens"])]


def _check_tokenizer(m: dict, out: Path) -> None:
    """prepare reads its tokenizer with the tokenizers library alone: the ids, byte counts and hash it wrote
    are those transformers gives for the same directory."""
    from zerokit.data.tokenizer import token_byte_lengths, tokenizer_hash
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert np.array_equal(np.load(out / "token_bytes.npy"), token_byte_lengths(tok))
    assert (m["tokenizer"]["hash"], m["vocab_size"], m["eos_id"]) == (tokenizer_hash(tok), len(tok), tok.eos_token_id)


def _check_counts(m: dict, planted: dict, out: Path) -> None:
    removed = {s["step"]: s for s in m["steps"]}
    assert list(removed) == ["gopher_repetition", "gopher_quality", "c4", "fineweb", "exact", "minhash"]
    for step in ("gopher_repetition", "gopher_quality", "c4", "fineweb", "exact"):  # each kind fails one step
        assert removed[step]["documents_removed"] == planted[step], (step, removed[step], planted[step])
        assert removed[step]["bytes_removed"] == planted["planted_bytes"][step], step
    near = removed["minhash"]["documents_removed"]
    assert abs(near - planted["near"]) <= 0.05 * planted["near"], (near, planted["near"])
    assert m["documents_in"] == planted["documents"] and m["bytes_in"] == planted["bytes"]
    assert m["documents"] == planted["documents"] - sum(s["documents_removed"] for s in m["steps"])
    assert m["bytes"] == m["bytes_in"] - sum(s["bytes_removed"] for s in m["steps"]) - m["bytes_rewritten_away"]
    for split, info in m["splits"].items():
        shards = info["shards"]
        assert all(s["tokens"] == m["shard_tokens"] for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= m["shard_tokens"]
        for s in shards:
            assert hashlib.sha256((out / s["file"]).read_bytes()).hexdigest() == s["sha256"]
        tokens = _shards(out, split)
        assert (tokens == m["eos_id"]).sum() == info["documents"]  # whole documents, each ending in eos
        # bits per byte counts what the tokens stand for: the kept text's bytes, exactly
        assert np.load(out / "token_bytes.npy")[tokens].sum() == info["bytes"], split
    assert 0 < m["splits"]["val"]["documents"] < m["documents"] // 10


@pytest.fixture(scope="module")
def planted(data_dir, tmp_path_factory):
    src = tmp_path_factory.mktemp("corpus")
    return src, prepare_corpus.build(data_dir, src, n_clean=300, files=3)


@pytest.fixture(scope="module")
def prepared(planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "out"
    prepare(str(planted[0]), out, workers=2, vocab_size=512, shard_tokens=4096, val_fraction=0.05, **ALL)
    return out


def test_planted_duplicates_and_junk_are_counted(planted, prepared):
    m = json.loads((prepared / "manifest.json").read_text())
    _check_counts(m, planted[1], prepared)
    assert m["dtype"] == "uint16" and m["language_id"].startswith("not run")
    _check_tokenizer(m, prepared)
    assert AutoTokenizer.from_pretrained(prepared / "tokenizer").vocab_size <= 512
    # the same settings again: already prepared, nothing redone; other settings: refused
    t0 = time.perf_counter()
    assert prepare(str(planted[0]), prepared, workers=2, vocab_size=512, shard_tokens=4096, val_fraction=0.05, **ALL)
    assert time.perf_counter() - t0 < 5
    r = subprocess.run([sys.executable, "-m", "zerokit", "prepare", str(planted[0]), str(prepared)],
                       capture_output=True, text=True, env=env(), timeout=120)
    assert r.returncode == 2 and "other settings" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("kind", ["sentencepiece_bpe", "sentencepiece_unigram"])
def test_sentencepiece_tokenizers_are_byte_exact(kind, planted, tmp_path):
    src = tmp_path / "mixed.jsonl"
    docs = ["Naïve café — 日本語 🎭\n\n  tabs\tand  spaces\n", "In 1999, 12345 people paid $3.50 (a 10% rise)."]
    docs += [json.loads(line)["text"] for line in (planted[0] / "part-000.jsonl").read_text().splitlines()[:120]]
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = prepare(str(src), tmp_path / "out", workers=0, tokenizer=kind, vocab_size=600, shard_tokens=1000,
                  val_fraction=0.1, sample_mb=0.05)
    m = json.loads((out / "manifest.json").read_text())
    assert m["tokenizer"]["spec"] == kind and m["tokenizer"]["sample_mb"] == 0.05
    _check_tokenizer(m, out)
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    lengths = np.load(out / "token_bytes.npy")
    for split in ("train", "val"):
        assert lengths[_shards(out, split)].sum() == m["splits"][split]["bytes"]
    for d in docs[:2]:  # digits one piece each, unseen characters as byte pieces, the text back exactly
        ids = tok(d, add_special_tokens=False).input_ids
        assert tok.decode(ids) == d and lengths[ids].sum() == len(d.encode())
        pieces = tok.convert_ids_to_tokens(ids)
        assert not any(p.strip("▁").isdigit() and len(p.strip("▁")) > 1 for p in pieces)


@pytest.mark.slow  # two prepare runs and a kill: ~45 s on the shared machine
def test_sigkill_then_rerun_gives_identical_shards(planted, tmp_path):
    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "zerokit", "prepare", str(planted[0]), str(out), "--vocab-size", "512",
                "--shard-tokens", "2048", "--val-fraction", "0.05", "--dedup", "exact", "--batch-mb", "0.02",
                "--workers", "2"]
    reference = tmp_path / "reference"  # uninterrupted, and in this process: the worker count changes nothing
    prepare(str(planted[0]), reference, workers=0, batch_mb=0.5, vocab_size=512, shard_tokens=2048,
            val_fraction=0.05, dedup="exact")
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd(out), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    progress = out / ".progress.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if progress.is_file() and len(json.loads(progress.read_text())["splits"]["train"]["shards"]) >= 3:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its workers, no clean-up
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it was killed; the test proves nothing"
    done = len(json.loads(progress.read_text())["splits"]["train"]["shards"])
    r = subprocess.run(cmd(out), capture_output=True, text=True, env=env(), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ref, got = (json.loads((d / "manifest.json").read_text()) for d in (reference, out))
    assert done < len(got["splits"]["train"]["shards"])
    assert got["splits"] == ref["splits"]  # shard lists with their sha256
    for s in ref["splits"]["train"]["shards"] + ref["splits"]["val"]["shards"]:
        assert (out / s["file"]).read_bytes() == (reference / s["file"]).read_bytes()


@pytest.mark.slow  # a recipe launch: ~30 s on the shared machine
def test_recipe_trains_on_a_prepared_directory(prepared, tmp_path):
    run_dir = tmp_path / "run"
    pretrain(run_dir, f"data.corpus={prepared}", "train.max_steps=3", "data.block_size=64", cache=tmp_path / "cache")
    rows = metrics(run_dir)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0 < summary["val_bpb"] < 20
    assert not (tmp_path / "cache" / "data").exists()  # nothing packed again: the prepared shards were read


def _peak_rss_mb(cmd: list[str], timeout: float) -> float:
    """Run `cmd`; the peak of its whole process tree's resident memory (the run and its workers), in MB."""
    import psutil
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak, deadline, p = 0, time.time() + timeout, psutil.Process(proc.pid)
    while proc.poll() is None and time.time() < deadline:
        try:
            peak = max(peak, sum(q.memory_info().rss for q in [p, *p.children(recursive=True)]))
        except psutil.Error:  # a worker exited between listing and reading
            pass
        time.sleep(0.1)
    _, err = proc.communicate(timeout=max(1, deadline - time.time()))
    assert proc.returncode == 0, err[-2000:]
    return peak / 1e6


@pytest.mark.slow
def test_corpus_counts_and_bounded_memory_at_two_sizes(data_dir, tmp_path):
    """D1: a corpus of ZEROKIT_PREPARE_MB (12 in CI) and one a quarter its size: the planted counts, and peak
    memory that does not grow with the corpus. Issue 16's 50 MB (ZEROKIT_PREPARE_MB=50) is run by hand: with
    every filter and dedup prepare does ~0.3 MB/s a core (datatrove's Gopher repetition filter is half of it),
    so 12.9 + 51.6 MB need an estimated 3 minutes of 2 idle cores (from the CPU seconds), beyond this test's
    CI share; by hand it took 24 minutes at load average 14 (479 / 494 MB peak, every planted count matched)."""
    target_mb = float(os.environ.get("ZEROKIT_PREPARE_MB", 12))
    peaks, sizes = [], []
    for mb in (target_mb / 4, target_mb):
        src = tmp_path / f"corpus{mb:g}"
        planted = prepare_corpus.build(data_dir, src, n_clean=int(mb * 1e6 / 1.85e3), files=8, seed=int(mb))
        out = tmp_path / f"out{mb:g}"
        peaks.append(_peak_rss_mb([sys.executable, "-m", "zerokit", "prepare", str(src), str(out), "--workers", "2",
                                   "--filters", "all", "--dedup", "--vocab-size", "4096", "--sample-mb", "5",
                                   "--shard-tokens", str(1 << 20), "--batch-mb", "1"], timeout=3600))
        sizes.append(planted["bytes"] / 1e6)
        _check_counts(json.loads((out / "manifest.json").read_text()), planted, out)
    assert sizes[1] >= min(50, target_mb)
    print(f"peak RSS (run + 2 workers): {peaks[0]:.0f} MB at {sizes[0]:.1f} MB of text, {peaks[1]:.0f} MB at {sizes[1]:.1f} MB")
    assert max(peaks) < 1500  # the bound: 3 Python processes with datatrove, tokenizers, a 5 MB sample
    assert peaks[1] < peaks[0] * 1.15 + 30  # 4x the corpus, about the same memory


def test_sources_txt_jsonl_gz_parquet_and_glob(planted, tmp_path):
    """Each file kind gives the documents written into it, in sorted-file order, through a folder or a glob."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    from zerokit.data.sources import iter_documents
    texts = [json.loads(line)["text"] for line in (planted[0] / "part-000.jsonl").read_text().splitlines()[:30]]
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(texts[0])
    with gzip.open(src / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts[1:10]))
    pq.write_table(pa.table({"text": texts[10:], "n": list(range(20))}), src / "c.parquet", row_group_size=7)
    (src / "notes.md").write_text("not a corpus file")
    assert list(iter_documents(str(src))) == texts
    assert list(iter_documents(str(src / "*.parquet"))) == texts[10:]
    out = prepare(str(src), tmp_path / "out", workers=0, vocab_size=300, shard_tokens=1 << 16, val_fraction=0.1)
    m = json.loads((out / "manifest.json").read_text())
    assert m["documents_in"] == m["documents"] == 30 and m["bytes"] == sum(len(t.encode()) for t in texts)
    assert m["splits"]["val"]["documents"] == 3
    # a tokenizer directory given (copied in, not re-saved by transformers): the same shards, tokens and hash
    given = prepare(str(src), tmp_path / "given", workers=0, tokenizer=str(out / "tokenizer"), shard_tokens=1 << 16,
                    val_fraction=0.1)
    g = json.loads((given / "manifest.json").read_text())
    assert g["splits"] == m["splits"] and g["tokenizer"]["hash"] == m["tokenizer"]["hash"]
    assert sorted(f.name for f in (given / "tokenizer").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    _check_tokenizer(g, given)


@pytest.mark.slow  # a recipe launch: ~30 s on the shared machine
def test_recipe_path_trains_sentencepiece_on_a_sample(data_dir, tmp_path):
    """The recipe's own (unprepared) path: data.tokenizer=sentencepiece_unigram trains on the first
    data.tokenizer_sample_mb of the training text, and its packed shards count bytes exactly."""
    from zerokit.config import Config
    from zerokit.data.packed import read_index
    from zerokit.pretraining import prepare_data
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((data_dir / "tinyshakespeare" / "input.txt").read_text()[:200_000] + "Año 2024: 12 €.\n")
    cfg = Config(corpus=str(corpus), text_field="text", tokenizer="sentencepiece_unigram", vocab_size=600,
                 val_fraction=0.1, tokenizer_sample_mb=0.05)
    tok, packed = prepare_data(cfg, tmp_path / "cache")
    assert "▁the" in tok.get_vocab() and "<0x0A>" in tok.get_vocab()
    index, lengths = read_index(packed), np.load(packed / "token_bytes.npy")
    for split in ("train", "val"):
        ids = np.fromfile(packed / f"{split}.bin", dtype=index["dtype"])
        assert lengths[ids].sum() == index["splits"][split]["bytes"], split
    # the cache key hashes the training text: the first 50 kB of the training split gives the same entry
    from zerokit.data.packed import corpus_texts
    from zerokit.data.tokenizer import take_sample, train_tokenizer
    again = train_tokenizer(take_sample(corpus_texts(corpus), 0.05), 600, tmp_path / "cache" / "tokenizers",
                            "sentencepiece_unigram")
    assert again == Path(tok.name_or_path) and again.name.startswith("tokenizer-sp-unigram600-")


def test_step_names_are_checked(tmp_path):
    from zerokit.data import quality
    from zerokit.errors import UsageError
    assert quality.parse("fineweb, gopher_quality", quality.FILTERS, "filter") == ["gopher_quality", "fineweb"]
    assert quality.parse("all", quality.DEDUP, "dedup method") == ["exact", "minhash"]
    with pytest.raises(UsageError, match="unknown filter langid; choose from gopher_repetition"):
        quality.parse("c4,langid", quality.FILTERS, "filter")
    with pytest.raises(UsageError, match="not a prepared directory"):
        (tmp_path / "x").mkdir()
        (tmp_path / "x" / "keep.txt").write_text("user data")
        prepare("tinyshakespeare", tmp_path / "x", workers=0)
