"""`zerokit prepare --slurm-tasks`: the pipeline as array jobs gives the local run's prepared directory (the
same shards byte for byte, counts, tokenizer): its stages run one after the other here, and for real on the
2-node test cluster (pytest -m slurm; conftest.py's `slurm` fixture)."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

import prepare_corpus
from slurm_cluster import BIN
from zerokit.data.prepare import prepare
from zerokit.data.prepare_slurm import STAGES, plan, run_stage

SETTINGS = dict(vocab_size=512, shard_tokens=2048, val_fraction=0.05, filters="all", dedup="exact,minhash")
CLI = ["--vocab-size", "512", "--shard-tokens", "2048", "--val-fraction", "0.05", "--filters", "all", "--dedup",
       "exact,minhash"]


@pytest.fixture(scope="module")
def corpus(data_dir, tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("corpus")
    prepare_corpus.build(data_dir, src, n_clean=150, files=3)  # 3 files over 2 tasks: one task gets two
    return src


@pytest.fixture(scope="module")
def local(corpus, tmp_path_factory) -> Path:
    return prepare(str(corpus), tmp_path_factory.mktemp("local") / "out", workers=0, **SETTINGS)


def _same_as_local(local: Path, out: Path) -> None:
    ref, got = (json.loads((d / "manifest.json").read_text()) for d in (local, out))
    for k in ("key", "documents_in", "bytes_in", "documents", "bytes", "tokens", "steps", "splits", "tokenizer"):
        assert got[k] == ref[k], k  # splits: every shard's file, tokens and sha256
    assert sum(s["documents_removed"] for s in ref["steps"]) > 0 and len(ref["splits"]["train"]["shards"]) > 2
    for s in ref["splits"]["train"]["shards"] + ref["splits"]["val"]["shards"]:
        assert (out / s["file"]).read_bytes() == (local / s["file"]).read_bytes()
    assert np.array_equal(np.load(out / "token_bytes.npy"), np.load(local / "token_bytes.npy"))
    assert not (out / ".work").exists()


def test_stages_one_after_the_other_give_the_local_directory(corpus, local, tmp_path):
    out = tmp_path / "out"
    tasks = plan(str(corpus), out, 2, **SETTINGS)
    assert tasks == 2
    for stage in STAGES:
        for task in range(tasks if stage in ("analyse", "encode") else 1):
            run_stage(stage, out.resolve(), task)
    _same_as_local(local, out)


@pytest.mark.slurm
def test_slurm_array_jobs_give_the_local_directory(slurm, corpus, local, tmp_path):
    out = tmp_path / "out"
    # 2 CPUs a task: a test node has 2, so the two tasks of an array run on the two nodes at once
    r = slurm.run(BIN / "zerokit", "prepare", corpus, out, "--slurm-tasks", "2", "--sbatch=--cpus-per-task=2", *CLI)
    jobs = [int(j) for j in re.search(r"submitted jobs ([\d ]+)", r.stdout).group(1).split()]
    assert len(jobs) == 4
    final = slurm.wait(jobs[-1], timeout=600)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((out / "slurm").glob("*.out")))
    assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", f"{final}\n{logs}"
    nodes = set()
    for stage, job in zip(STAGES, jobs):  # the arrays ran 2 tasks each, the others one
        found = sorted((out / "slurm").glob(f"{stage}-{job}_*.out"))
        assert len(found) == (2 if stage in ("analyse", "encode") else 1), (stage, found)
        nodes |= {re.search(r"\(node (\w+)\)", p.read_text()).group(1) for p in found}
    assert nodes == {"n1", "n2"}, logs
    _same_as_local(local, out)
    print("\n" + logs)
