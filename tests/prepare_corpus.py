"""A synthetic web-like corpus with planted duplicates and junk at known counts (tests/test_prepare.py,
bench/prepare_throughput.sh). Clean documents are paragraphs of DialogSum summaries (speaker tags
replaced by names); each planted kind is built to fail exactly one step."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack", "Kate", "Leo"]
KINDS = ("clean", "exact", "near", "gopher_repetition", "gopher_quality", "c4", "fineweb")


def _summaries(data_dir: Path) -> list[str]:
    """The summaries, whitespace collapsed, without those C4's line filter would cut (cookies, policies,
    citations...): clean documents then pass every step unchanged, so planted bytes are removed bytes."""
    from datatrove.pipeline.filters.c4_filters import CITATION_REGEX, POLICY_SUBSTRINGS
    out = []
    for line in (data_dir / "dialogsum" / "train.jsonl").read_text().splitlines():
        s = " ".join(json.loads(line)["summary"].split())
        low = s.lower()
        if s and not CITATION_REGEX.search(s) and "{" not in s and "javascript" not in low and \
                "lorem ipsum" not in low and not any(p in low for p in POLICY_SUBSTRINGS):
            out.append(s)
    return out


def _clean(rng: random.Random, summaries: list[str]) -> str:
    names = rng.sample(NAMES, 3)
    sizes = [rng.randint(3, 4) for _ in range(rng.randint(3, 4))]
    picked = rng.sample(summaries, sum(sizes))  # no summary twice in a document (Gopher counts repeats)
    paras = []
    for n in sizes:
        text = " ".join(picked[:n])
        picked = picked[n:]
        for k, name in enumerate(names, 1):
            text = text.replace(f"#Person{k}#", name)
        paras.append(re.sub(r"#Person\d#", "Someone", text))
    return "\n".join(paras)


def _junk(kind: str, rng: random.Random, summaries: list[str]) -> str:
    base = _clean(rng, summaries)
    if kind == "gopher_repetition":  # one line, many times
        return "\n".join([rng.choice(summaries)] * 30)
    if kind == "gopher_quality":  # words without letters, no stop words
        return "\n".join(" ".join(str(rng.randrange(10**5)) for _ in range(10)) + "." for _ in range(8))
    if kind == "c4":  # boilerplate that C4 drops whole documents for
        return base + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor."
    if kind == "fineweb":  # lines without punctuation (menus, lists)
        words = re.sub(r"[^\w\s]", "", base).split()
        lines = [words[i:i + 6] for i in range(0, len(words), 6)]
        if len(lines) > 1 and len(lines[-1]) < 3:  # C4 would drop a line under 3 words: keep the text as built
            lines[-2] += lines.pop()
        return "\n".join(" ".join(line) for line in lines)
    raise ValueError(kind)


def _near(rng: random.Random, doc: str, k: int) -> str:
    """`doc` with one word changed to one no other near copy has (two copies of one document stay distinct)."""
    words = doc.split(" ")
    words[len(words) // 2 + rng.randint(-3, 3)] = f"zebra{k}"
    return " ".join(words)


def build(data_dir: Path, out: Path, n_clean: int, seed: int = 0, rates: dict | None = None,
          files: int = 1) -> dict:
    """Write `files` JSONL files (field text) under out/; returns the documents of each kind, the total
    documents and bytes, and planted_bytes (the bytes of each planted kind)."""
    rates = rates or {"exact": 0.05, "near": 0.05, "gopher_repetition": 0.02, "gopher_quality": 0.02, "c4": 0.02,
                      "fineweb": 0.02}
    rng = random.Random(seed)
    summaries = _summaries(data_dir)
    clean = [_clean(rng, summaries) for _ in range(n_clean)]
    docs = [(i, d) for i, d in enumerate(clean)]  # (position key, text); planted copies go after their original
    counts = {"clean": n_clean}
    planted_bytes = {}
    for kind, rate in rates.items():
        n = round(n_clean * rate)
        counts[kind], planted_bytes[kind] = n, 0
        for k in range(n):
            if kind in ("exact", "near"):
                j = rng.randrange(n_clean)
                text = clean[j] if kind == "exact" else _near(rng, clean[j], k)
                docs.append((rng.uniform(j + 0.5, n_clean), text))
            else:
                text = _junk(kind, rng, summaries)
                docs.append((rng.uniform(0, n_clean), text))
            planted_bytes[kind] += len(text.encode())
    docs.sort(key=lambda x: x[0])
    out.mkdir(parents=True, exist_ok=True)
    per = -(-len(docs) // files)
    for f in range(files):
        with open(out / f"part-{f:03d}.jsonl", "w") as fh:
            for _, text in docs[f * per:(f + 1) * per]:
                fh.write(json.dumps({"text": text}) + "\n")
    counts["documents"] = len(docs)
    counts["bytes"] = sum(len(t.encode()) for _, t in docs)
    counts["planted_bytes"] = planted_bytes
    return counts
