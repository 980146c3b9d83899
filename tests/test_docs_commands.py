"""H3: every shell command in README.md and docs/*.md runs as written on a fresh clone, or its block
is marked as not runnable here. Blocks fenced as ```bash run; ```bash gpu, ```bash cluster,
```bash network (hub downloads) and ```bash long (tens of minutes) are not run, and the text beside
each says so. Every repository path the docs name, in blocks and in `backticks`, must exist.

Runnable blocks run in a clone of the committed repository (one clone per document; its blocks in
order, so a later block may use what an earlier one wrote), with ../shared/data beside it and no
ZEROKIT_DATA set, as on a newcomer's machine. Nothing is on PATH from the venv until the document
says `source .venv/bin/activate`. The clone's `.venv` is this venv (linked, with the set-up stamp
`make` checks, so `make demo` does not reinstall) and the clone's own `zerokit` is the one imported.
Only the size of the work changes: training commands get a few steps of a tiny model appended (later
key=value settings win) and at most 2 ranks; everything else runs exactly as written."""
from __future__ import annotations

import glob
import hashlib
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch_util import BIN, REPO, env, kill_all

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PATH_DOCS = [*DOCS, REPO / "zerokit" / "ds_configs" / "README.md"]  # whose named paths must exist
FENCE = re.compile(r"^```(\w*)[ \t]*([\w-]*)[^\n]*\n(.*?)^```", re.M | re.S)
MARKS = {"": "run", "gpu": "needs a GPU", "cluster": "needs a cluster", "network": "needs a network",
         "long": "long-running"}
SHELLS = {"bash", "sh", "shell", "console"}

# Appended to training commands. Checkpointing is left as the recipe's YAML has it (a documented
# export must find what the documented run writes): pre-training checkpoints its last step. The
# context stays the YAML's (128): the documented `zerokit generate` asks for 64 new tokens.
TINY = {
    "pretrain_gpt": ["train.max_steps=2", "train.log_every=1", "data.eval_batches=2", "sample.max_new_tokens=4",
                     "model.preset=gpt-tiny", "data.vocab_size=512"],
    "finetune_sentiment": ["train.max_steps=2", "train.log_every=1", "train.micro_batch_size=4"],
    "finetune_summarization": ["train.max_steps=2", "train.log_every=1", "train.micro_batch_size=2",
                               "data.max_length=128", "eval.max_samples=4", "eval.max_new_tokens=8"],
}
RANKS = re.compile(r"(--nproc_per_node|--num_processes|--gpus)([ =])(\d+)")
NO_LAUNCH = {"estimate", "plan", "slurm"}  # zerokit commands whose --gpus describes a machine, launches nothing
ACTIVATE = {"source .venv/bin/activate", ". .venv/bin/activate"}


def line_of(text: str, pos: int) -> int:
    return text[:pos].count("\n") + 1


def blocks(doc: Path) -> list[tuple[int, str, str]]:
    """(line, mark, body) for every shell block of a document."""
    text, found = doc.read_text(), []
    for m in FENCE.finditer(text):
        lang, mark, body = m.group(1), m.group(2), m.group(3)
        if lang in SHELLS:
            assert mark in MARKS, f"{doc.name}:{line_of(text, m.start())}: unknown mark {mark!r}; use one of {sorted(MARKS)}"
            found.append((line_of(text, m.start()), MARKS[mark], body))
    return found


def commands(body: str) -> list[list[str]]:
    """Logical lines (backslash continuations joined) as words, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


def recipe_of(words: list[str]) -> str | None:
    """The recipe a command trains: recipes/NAME.py, or `zerokit train NAME` (also -m zerokit)."""
    for i, w in enumerate(words):
        if w.startswith("recipes/") and w.endswith(".py"):
            return Path(w).stem
        if w == "zerokit" and words[i + 1:i + 2] == ["train"] and len(words) > i + 2:
            return words[i + 2]
    return None


def subcommand(words: list[str]) -> str | None:
    return words[1] if words[0] == "zerokit" and len(words) > 1 else None


def shrink(words: list[str]) -> list[str]:
    """At most 2 ranks where a command launches them; a training command gets a few steps of a tiny model."""
    if words[:2] == ["make", "demo"]:
        args = [w[5:] for w in words[2:] if w.startswith("ARGS=")] + TINY["pretrain_gpt"]
        return ["make", "demo", "ARGS=" + " ".join(args)]
    if subcommand(words) == "slurm":  # writes a batch script; nothing trains here
        return words
    if subcommand(words) not in NO_LAUNCH or "--verify" in words:
        words = shlex.split(RANKS.sub(lambda m: f"{m.group(1)}{m.group(2)}{min(int(m.group(3)), 2)}",
                                      shlex.join(words)))
        if words[:2] == ["bash", "launch/torchrun.sh"] and words[2].isdigit():
            words = [*words[:2], str(min(int(words[2]), 2)), *words[3:]]
    recipe = recipe_of(words)
    return words + TINY[recipe] if recipe else words


def tops() -> set[str]:
    """The repository's top-level names (tracked files only: no .venv, runs/ ...)."""
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return {p.split("/")[0] for p in out.splitlines()}


def exists(path: str) -> bool:
    return bool(glob.glob(str(REPO / path))) if any(c in path for c in "*?[") else (REPO / path).exists()


def named_paths(doc: Path, top: set[str]) -> list[tuple[int, str]]:
    """(line, path) for every repository path a document names: words of its shell blocks, and
    `backticked` names in its prose, whose first component is a top-level name of the repository."""
    text, found = doc.read_text(), []
    for m in FENCE.finditer(text):
        if m.group(1) in SHELLS:
            for words in commands(m.group(3)):
                found += [(line_of(text, m.start()), w.split("=", 1)[-1]) for w in words]
    for m in re.finditer(r"`([^`\s]+)`", text):
        found.append((line_of(text, m.start()), m.group(1)))
    keep = []
    for line, p in found:
        p = p.rstrip(".,;:)")
        if "/" in p and p.split("/")[0] in top and not re.search(r"[<>$]|\.\.", p):
            keep.append((line, p))
    return keep


def test_every_shell_block_is_run_or_marked():
    found = [(doc, *b) for doc in DOCS for b in blocks(doc)]
    assert any(mark == "run" for *_, mark, _ in found), "no runnable shell blocks found in README.md and docs/*.md"
    for doc, line, mark, body in found:
        if mark != "run":
            text = doc.read_text().splitlines()
            nearby = " ".join(text[max(0, line - 4):line + body.count("\n") + 4]).lower()
            assert mark.lower() in nearby, f"{doc.name}:{line}: a block fenced as {mark!r} must say '{mark}' beside it"


def test_every_named_path_exists():
    top = tops()
    missing = [f"{doc.relative_to(REPO)}:{line}: {p}" for doc in PATH_DOCS for line, p in named_paths(doc, top)
               if not exists(p)]
    assert not missing, "paths named in the docs that the repository lacks:\n" + "\n".join(missing)


def make_clone(root: Path, data_dir: Path) -> Path:
    """A clone of the committed repository, ../shared/data beside it, and this venv as its .venv."""
    clone = root / "zerokit"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    (root / "shared").mkdir()
    (root / "shared" / "data").symlink_to(data_dir)
    venv = clone / ".venv"
    venv.mkdir()
    for entry in Path(sys.prefix).iterdir():
        if entry.name != ".zerokit-setup":
            (venv / entry.name).symlink_to(entry)
    # The stamp scripts/setup_venv.sh compares (its own formula): `make` then finds the venv set up and
    # installs nothing (an install here would point the shared venv's editable zerokit at this clone).
    digest = hashlib.sha256(b"".join((clone / f).read_bytes() for f in
                                     ("setup.cfg", "pyproject.toml", "scripts/setup_venv.sh"))).hexdigest()
    (venv / ".zerokit-setup").write_text(f"{digest[:16]}-dev,demo\n")
    return clone


def run_line(cmd: str, clone: Path, environ: dict, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, shell=True, executable="/bin/bash", cwd=clone, env=environ, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_all(proc)
        out, err = proc.communicate()
        return subprocess.CompletedProcess(cmd, "timeout", out, err)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


RUNNABLE = [doc for doc in DOCS if any(mark == "run" for _, mark, _ in blocks(doc))]


@pytest.mark.slow
@pytest.mark.parametrize("doc", RUNNABLE, ids=[d.name for d in RUNNABLE])
def test_blocks_run_on_a_fresh_clone(tmp_path, data_dir, doc):
    clone = make_clone(tmp_path, data_dir)
    system_path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != BIN)
    # DeepSpeed's op builds name the clone's venv path in their flags: a folder of their own, or every
    # other test and these runs would rebuild the ops in turn.
    environ = env(HOME=tmp_path / "home", PYTHONPATH=clone, PATH=system_path,
                  TORCH_EXTENSIONS_DIR=tmp_path / "torch_extensions")
    for unset in ("ZEROKIT_DATA", "ZEROKIT_EXTRAS", "VIRTUAL_ENV"):
        environ.pop(unset, None)
    timings = []
    for line, mark, body in blocks(doc):
        if mark != "run":
            continue
        for words in commands(body):
            cmd = shlex.join(words) if shlex.join(words) in ACTIVATE else shlex.join(shrink(words))
            t0 = time.perf_counter()
            proc = run_line(cmd, clone, environ, timeout=600)
            timings.append(f"{time.perf_counter() - t0:6.1f} s  {doc.name}:{line}  {cmd[:150]}")
            assert proc.returncode == 0, (f"{doc.name}:{line}: {cmd}\nexit {proc.returncode}\n"
                                          f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}\nbefore it:\n" + "\n".join(timings))
            if cmd in ACTIVATE:  # what activating does for the commands after it
                environ.update(PATH=f"{clone / '.venv' / 'bin'}{os.pathsep}{system_path}", VIRTUAL_ENV=str(clone / ".venv"))
    print("\n".join(timings))
