"""Kill anywhere: 2-rank ZeRO-2 and 2-rank FSDP runs (fp32, gpt-tiny, dropout on, a checkpoint every
3 steps) are SIGKILLed at 20 moments in all, chosen by a seeded generator: at a random time after
launch (start-up, checkpoint load), a random delay after a random step, and the moment a chosen
step_N.tmp folder appears (inside a save, the final one included). After each kill the run is
started again with resume=auto. Asserted: the run always resumes from the newest checkpoint left
(which verifies against its manifest), and the finished run's per-step losses equal the
uninterrupted run's bit for bit.

What each kill hit and what the next run resumed from: test-reports/kill_anywhere.{json,md}
(printed too). The trigger plan is reproducible (SEED); where a kill lands within a save depends
on the machine's timing, which the report records.

torchrun starts every rank in a session of its own, so killing torchrun's process group leaves the
ranks running: `kill_all` SIGKILLs the launcher's group and each rank's group.

Not zerokit's: every DeepSpeed start holds torch's JIT-extension lock (<ext dir>/<op>/lock) while ninja
checks the op; a SIGKILL in that window leaves the lock and every later start waits for it forever. The
runs here use a private extension folder, and a lock left by a kill is removed (and reported), as a
user would have to.
"""
import json
import random
import re
import subprocess
import time
from pathlib import Path

import pytest

from launch_util import PRETRAIN, REPO, TINY, env, kill_all, launcher, losses, run
from zerokit.manifest import problems

SEED = 1412
STEPS, EVERY = 24, 3
KILLS_PER_ENGINE = 10
ENGINES = {"zero2": ["ds_config=ds_configs/zero2.json"], "fsdp_full_shard": ["fsdp=full_shard"]}
REPORT = REPO / "test-reports" / "kill_anywhere"
EXTENSIONS = Path.home() / ".cache" / "zerokit-tests" / "torch_extensions"  # built once, by the reference run
RESUMED = re.compile(r"resumed from (\S+) at step (\d+)")


def run_args(cache: Path) -> list[str]:
    return ["model.dropout=0.1", "train.precision=fp32", f"train.max_steps={STEPS}", f"train.checkpoint_every={EVERY}",
            "train.keep_checkpoints=2", "train.micro_batch_size=4", f"data.cache_dir={cache}"]


def newest(run_dir: Path) -> tuple[int, Path] | None:
    root = run_dir / "checkpoints"
    found = sorted((int(p.name[5:]), p) for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()) \
        if root.is_dir() else []
    return found[-1] if found else None


def logged_step(run_dir: Path, since_ns: int = 0) -> int:
    """The last step in metrics.jsonl; 0 if the file was not written since `since_ns` (the lines of an
    earlier attempt are not this attempt's progress)."""
    path = run_dir / "metrics.jsonl"
    try:
        if path.stat().st_mtime_ns <= since_ns:
            return 0
        lines = path.read_text().split("\n")[:-1]  # complete lines only: the writer may be mid-line
    except FileNotFoundError:
        return 0
    return max((json.loads(ln)["step"] for ln in lines if '"loss"' in ln), default=0)


class Trigger:
    """When to kill, drawn from the seeded generator before the run; positions relative to the step
    the run resumes from (`start`) so that every kill lies ahead of it."""

    def __init__(self, kind: str, rng: random.Random):
        self.kind, self.u = kind, rng.random()
        # a gpt-tiny save takes a few tens of ms: short delays land inside it, longer ones just after;
        # after a step, short enough that the run cannot finish first
        self.delay = rng.uniform(0.0, 0.08) if kind in ("save", "final_save") else rng.uniform(0.0, 0.05)
        self.after_s = rng.uniform(1.0, 10.0)  # start-up (imports, engine, checkpoint load) takes ~10-30 s here

    def describe(self, start: int) -> str:
        if self.kind == "time":
            return f"{self.after_s:.1f} s after launch"
        if self.kind == "step":
            return f"{self.delay:.2f} s after step {self.step(start)} was logged"
        return f"{self.delay:.3f} s after step_{self.save(start)}.tmp appeared"

    def step(self, start: int) -> int:  # before the last: the run must still be going after `delay`
        return start + 1 + int(self.u * max(0, STEPS - 2 - start))

    def save(self, start: int) -> int:
        if self.kind == "final_save":
            return STEPS
        ahead = list(range((start // EVERY + 1) * EVERY, STEPS, EVERY))
        return ahead[int(self.u * len(ahead))] if ahead else STEPS

    def arm(self, run_dir: Path, start: int) -> dict:
        """Just before launch: what belongs to earlier attempts (their log lines, their half-written save)."""
        tmp = run_dir / "checkpoints" / f"step_{self.save(start)}.tmp"
        return {"launch_ns": time.time_ns(), "tmp": tmp, "stale_tmp": tmp.is_dir(),
                "done": run_dir / "checkpoints" / f"step_{self.save(start)}"}

    def fired(self, run_dir: Path, start: int, since_launch: float, state: dict) -> bool:
        if self.kind == "time":
            return since_launch >= self.after_s
        if "seen" not in state:
            if self.kind == "step":
                if logged_step(run_dir, state["launch_ns"]) < self.step(start):
                    return False
            elif state["stale_tmp"]:  # an earlier attempt's: wait until this run removes it
                state["stale_tmp"] = state["tmp"].is_dir()
                return False
            elif not (state["tmp"].is_dir() or state["done"].is_dir()):  # a save faster than the poll: just after it
                return False
            state["seen"] = time.perf_counter()
        return time.perf_counter() - state["seen"] >= self.delay


def plan(rng: random.Random) -> list[Trigger]:
    kinds = ["time"] * 2 + ["step"] * 4 + ["save"] * 3
    rng.shuffle(kinds)
    return [Trigger(k, rng) for k in kinds + ["final_save"]]


def command(run_dir: Path, cache: Path, extra: list[str], resume: str = "auto") -> list[str]:
    args = [a if a != "resume=none" else f"resume={resume}" for a in TINY]
    return [*launcher(2), PRETRAIN, *args, f"run_dir={run_dir}", *run_args(cache), *extra]


def launch(run_dir: Path, cache: Path, extra: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(command(run_dir, cache, extra), cwd=REPO, env=env(TORCH_EXTENSIONS_DIR=EXTENSIONS),
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def remove_stale_extension_locks() -> list[str]:
    """Every process of the run is dead: a lock left in the extension folder can only be stale."""
    stale = sorted(EXTENSIONS.glob("*/lock"))
    for lock in stale:
        lock.unlink()
    return [lock.parent.name for lock in stale]


def resumed_from(log: Path) -> str | None:
    """What the run chose to resume from, None if it was killed before choosing."""
    text = log.read_text()
    if "nothing to do" in text:
        return "nothing to do (at max_steps)"
    if m := RESUMED.search(text):
        return f"step_{m.group(2)}"
    return "nothing (fresh start)" if "no checkpoint in" in text else None


def name(found) -> str:
    return f"step_{found[0]}" if found else "none"


def expected_resume(found) -> str:
    if not found:
        return "nothing (fresh start)"
    return "nothing to do (at max_steps)" if found[0] == STEPS else f"step_{found[0]}"


@pytest.fixture(scope="module")
def cache(tmp_path_factory, data_dir):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.slow
def test_kill_anywhere_then_resume_auto_is_bit_exact(tmp_path, cache):
    rng = random.Random(SEED)
    records, started = [], time.perf_counter()
    try:
        kill_and_resume(tmp_path, cache, rng, records)
    finally:  # a failure's report shows how far it got
        write_report(records, time.perf_counter() - started)


def kill_and_resume(tmp_path: Path, cache: Path, rng: random.Random, records: list[dict]) -> None:
    for engine, extra in ENGINES.items():
        ref = tmp_path / f"ref_{engine}"
        run(command(ref, cache, extra, resume="none"), TORCH_EXTENSIONS_DIR=EXTENSIONS)
        run_dir, logs = tmp_path / engine, tmp_path / f"logs_{engine}"
        logs.mkdir()
        expect = expected_resume(None)
        for i, trigger in enumerate(plan(rng)):
            log = logs / f"attempt{i}.log"
            start = newest(run_dir)[0] if newest(run_dir) else 0
            metrics_before = (run_dir / "metrics.jsonl").read_bytes() if (run_dir / "metrics.jsonl").is_file() else None
            state = trigger.arm(run_dir, start)
            proc, t0 = launch(run_dir, cache, extra, log), time.perf_counter()
            while proc.poll() is None and not trigger.fired(run_dir, start, time.perf_counter() - t0, state):
                time.sleep(0.002)
            at = time.perf_counter() - t0
            exited = proc.poll()
            kill_all(proc)
            left = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.tmp")) \
                if (run_dir / "checkpoints").is_dir() else []
            locks = remove_stale_extension_locks()
            assert exited in (None, 0), f"run failed before its kill (exit {exited}):\n{log.read_text()[-4000:]}"
            got = resumed_from(log)
            if got is None:  # killed before it chose: it cannot have trained or logged anything
                got = "killed before choosing"
                assert ((run_dir / "metrics.jsonl").read_bytes() if metrics_before is not None else None) == metrics_before
            else:
                assert got == expect, f"attempt {i} resumed from {got}, the newest checkpoint was {expect}\n{log.read_text()[-3000:]}"
            found = newest(run_dir)
            if found:
                assert problems(found[1]) == [], f"{found[1]} does not verify after the kill"
            records.append({"engine": engine, "kill": sum(r["kill"] != "-" for r in records) + 1, "trigger": trigger.describe(start),
                            "killed_at_s": round(at, 2), "exited_before_kill": exited == 0,
                            "last_logged_step": logged_step(run_dir, state["launch_ns"]) or "-", "tmp_folders_left": left,
                            "resumed_from": got, "newest_checkpoint_after_kill": name(found),
                            "stale_extension_locks_removed": locks})
            expect = expected_resume(found)
        log = logs / "final.log"
        proc = launch(run_dir, cache, extra, log)
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
        assert resumed_from(log) == expect, log.read_text()[-3000:]
        records.append({"engine": engine, "kill": "-", "trigger": "final run, not killed", "killed_at_s": None,
                        "exited_before_kill": True, "last_logged_step": logged_step(run_dir),
                        "tmp_folders_left": [], "resumed_from": resumed_from(log),
                        "newest_checkpoint_after_kill": name(newest(run_dir))})
        got, want = losses(run_dir), losses(ref)
        assert got == want, f"{engine}: losses differ after the kills: " + \
            str({s: (got.get(s), want.get(s)) for s in sorted(set(got) | set(want)) if got.get(s) != want.get(s)})
        assert newest(run_dir)[0] == STEPS and problems(newest(run_dir)[1]) == []


def write_report(records: list[dict], seconds: float) -> None:
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.with_suffix(".json").write_text(json.dumps({"seed": SEED, "steps": STEPS, "checkpoint_every": EVERY,
                                                       "seconds": round(seconds), "kills": records}, indent=1))
    rows = ["| engine | kill | trigger | killed at (s after launch) | last step this attempt logged | *.tmp left (killed inside a save) | "
            "newest checkpoint after | next run resumed from | notes |", "|---|---|---|---|---|---|---|---|---|"]
    for r, nxt in zip(records, records[1:] + [None]):
        then = nxt["resumed_from"] if nxt and nxt["engine"] == r["engine"] else "-"
        rows.append(f"| {r['engine']} | {r['kill']} | {r['trigger']} | {r['killed_at_s'] if r['killed_at_s'] is not None else '-'}"
                    f"{' (had exited)' if r['exited_before_kill'] and r['kill'] != '-' else ''} | {r['last_logged_step']} | "
                    f"{', '.join(r['tmp_folders_left']) or '-'} | {r['newest_checkpoint_after_kill']} | {then} | "
                    f"{'stale torch-extension lock removed: ' + ', '.join(locks) if (locks := r.get('stale_extension_locks_removed')) else ''} |")
    text = (f"Kill-anywhere run: seed {SEED}, {STEPS} steps, checkpoint every {EVERY}, {round(seconds)} s; final "
            f"losses equal the uninterrupted runs' bit for bit.\n\n" + "\n".join(rows) + "\n")
    REPORT.with_suffix(".md").write_text(text)
    print("\n" + text)
