"""prepare_data: several ranks at once pack a corpus once (a file lock, not a collective), and a
repeat run with unchanged source files reads neither the corpus nor its hash."""
import subprocess
import sys
import textwrap
from pathlib import Path

from zerokit.config import Config
from zerokit.data import packed as packed_mod
from zerokit.pretraining import prepare_data


def _data_cfg(corpus: Path) -> Config:
    return Config(corpus=str(corpus), text_field="text", tokenizer="train", vocab_size=300, val_fraction=0.1)


def test_repeat_run_does_not_read_the_corpus(tmp_path, monkeypatch, data_dir):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((data_dir / "tinyshakespeare" / "input.txt").read_text()[:50_000])
    tok, first = prepare_data(_data_cfg(corpus), tmp_path / "cache")

    def no_reading(*args, **kwargs):
        raise AssertionError("the corpus was read again on a cache hit")
    monkeypatch.setattr(packed_mod, "_load_documents", no_reading)
    tok2, again = prepare_data(_data_cfg(corpus), tmp_path / "cache")
    assert again == first and tok2.get_vocab() == tok.get_vocab()

    monkeypatch.undo()  # a changed file (new size and mtime) is read and packed anew
    with corpus.open("a") as f:
        f.write("\nA NEW LINE OF TEXT.\n")
    _, changed = prepare_data(_data_cfg(corpus), tmp_path / "cache")
    assert changed != first


def test_concurrent_ranks_pack_once(tmp_path, data_dir):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((data_dir / "tinyshakespeare" / "input.txt").read_text()[:200_000])
    script = textwrap.dedent(f"""
        import logging, sys
        from zerokit.config import Config
        from zerokit.pretraining import prepare_data
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        cfg = Config(corpus={str(corpus)!r}, text_field="text", tokenizer="train", vocab_size=300, val_fraction=0.1)
        print(prepare_data(cfg, __import__("pathlib").Path({str(tmp_path / "cache")!r}))[1])
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    assert len({o.strip() for o, _ in outs}) == 1  # the same packed directory for all
    trained = sum(e.count("trained tokenizer") for _, e in outs)
    packed = sum(e.count("INFO:zerokit:packed ") for _, e in outs)
    served = sum(e.count("source unchanged") for _, e in outs)
    assert (trained, packed, served) == (1, 1, 2), [e[-1500:] for _, e in outs]
