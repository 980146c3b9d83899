"""H3: every shell command in README.md and docs/*.md runs as written on a fresh clone, or its block
is marked as needing a GPU or a cluster. Blocks fenced as ```bash run; ```bash gpu and ```bash cluster
are not run here (the text beside them says so). Every repository path a block names must exist.

Runnable blocks run in a clone of the committed repository, with the venv's bin/ first on PATH (as
after `source .venv/bin/activate`) and ../shared/data beside it. Only the size of the work changes:
training commands get a few steps of a tiny model appended (later key=value settings win) and at
most 2 ranks; everything else runs exactly as written."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from launch_util import BIN, REPO, env

pytestmark = pytest.mark.slow

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[ \t]*([\w-]*)[^\n]*\n(.*?)^```", re.M | re.S)
MARKS = {"": "run", "gpu": "needs a GPU", "cluster": "needs a cluster"}
SHELLS = {"bash", "sh", "shell", "console"}

# Appended to every training command: a few steps of a tiny model, evaluated and checkpointed once.
TINY_RUN = ["train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=1",
            "data.eval_batches=2", "sample.max_new_tokens=4"]
TINY_GPT = ["model.preset=gpt-tiny", "data.block_size=32", "data.vocab_size=512"]
RANKS = re.compile(r"(--nproc_per_node|--num_processes|--gpus)([ =])(\d+)")


def blocks() -> list[tuple[Path, int, str, str]]:
    """(doc, line, mark, commands) for every shell block."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for m in FENCE.finditer(text):
            lang, mark, body = m.group(1), m.group(2), m.group(3)
            if lang in SHELLS:
                assert mark in MARKS, f"{doc.name}:{text[:m.start()].count(chr(10)) + 1}: unknown mark {mark!r}; use one of {sorted(MARKS)}"
                found.append((doc, text[:m.start()].count("\n") + 1, MARKS[mark], body))
    return found


def commands(body: str) -> list[str]:
    """Logical lines (backslash continuations joined), comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(words)
    return out


def shrink(words: list[str]) -> list[str]:
    """At most 2 ranks; a training command gets a few steps of a tiny model appended."""
    line = RANKS.sub(lambda m: f"{m.group(1)}{m.group(2)}{min(int(m.group(3)), 2)}", shlex.join(words))
    words = shlex.split(line)
    recipe = next((w for w in words if w.startswith("recipes/") and w.endswith(".py")), None)
    if words[:2] == ["zerokit", "train"] and len(words) > 2:
        recipe = words[2]
    if words[:2] == ["make", "demo"]:
        return ["make", "demo", "ARGS=" + " ".join(TINY_RUN + TINY_GPT)]
    if recipe is None:
        return words
    extra = TINY_RUN + (TINY_GPT if "pretrain" in recipe else [])
    if "--" in words and words[0] == "zerokit" and words[1] == "slurm":  # settings follow the --
        return words + extra
    return words + extra


def repo_paths(words: list[str]) -> list[str]:
    """Words that name a file of this repository (checked to exist in the clone)."""
    tops = {p.name for p in REPO.iterdir()}
    return [w.split("=", 1)[-1] for w in words
            if "/" in w.split("=", 1)[-1] and w.split("=", 1)[-1].split("/")[0] in tops]


@pytest.fixture(scope="module")
def clone(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("fresh")
    subprocess.run(["git", "clone", "-q", str(REPO), str(root / "zerokit")], check=True)
    (root / "shared").mkdir()
    (root / "shared" / "data").symlink_to(data_dir)
    # The clone uses this venv (what `make` would create there) instead of installing a second one.
    (root / "zerokit" / ".venv").symlink_to(Path(sys.prefix))
    return root / "zerokit"


ALL = blocks()


def test_every_shell_block_is_run_or_marked():
    assert ALL, "no shell blocks found in README.md and docs/*.md"
    for doc, line, mark, body in ALL:
        if mark != "run":
            text = doc.read_text().splitlines()
            nearby = " ".join(text[max(0, line - 4):line + body.count("\n") + 4]).lower()
            assert mark in nearby, f"{doc.name}:{line}: a block fenced as {mark!r} must say '{mark}' beside it"


@pytest.mark.parametrize("doc,line,mark,body", [b for b in ALL if b[2] == "run"],
                         ids=[f"{b[0].name}:{b[1]}" for b in ALL if b[2] == "run"])
def test_block_runs_on_a_fresh_clone(clone, tmp_path, doc, line, mark, body):
    for words in commands(body):
        for path in repo_paths(words):
            assert (clone / path).exists() or (clone / path).parent.exists(), f"{doc.name}:{line}: {path} does not exist"
        cmd = shrink(words)
        proc = subprocess.run(shlex.join(cmd), shell=True, cwd=clone, capture_output=True, text=True, timeout=900,
                              env=env(PATH=f"{BIN}:{os.environ['PATH']}", HOME=str(tmp_path / "home")))
        assert proc.returncode == 0, f"{doc.name}:{line}: {shlex.join(cmd)}\nexit {proc.returncode}\n{proc.stderr[-4000:]}"
