"""Checkpoints that cannot go wrong (zerokit/checkpoint.py, zerokit/manifest.py), one process, in-process
recipe runs (fast): the final step is saved; a finished run started again does nothing and changes
nothing; a damaged checkpoint is passed over (and kept); a checkpoint that does not fit the run's
shapes is refused in one line; resuming from an older step moves the newer ones aside; a save that
cannot be written (disk full, read-only) removes its half-written folder and keeps the older ones.
The references are independent: sha256 computed here, and an uninterrupted run's losses."""
import hashlib
import json
import logging
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from launch_util import REPO, TINY, losses
from zerokit.recipe import run_recipe

YAML = REPO / "recipes" / "configs" / "pretrain_gpt.yaml"
STEPS, EVERY = 6, 4  # checkpoints at 4 (periodic) and 6 (final)


def pretrain(run_dir: Path, cache: Path, *overrides: str) -> int:
    """`python recipes/pretrain_gpt.py ...` in this process; returns its exit status."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("pretrain_gpt", REPO / "recipes" / "pretrain_gpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}  # the loop installs its own
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = [*TINY, f"run_dir={run_dir}", f"data.cache_dir={cache}", f"train.max_steps={STEPS}",
                f"train.checkpoint_every={EVERY}", "train.min_lr=1e-3", "resume=auto", *overrides]  # constant lr
        # after warm-up: runs to different max_steps share their first steps, so losses compare
        return run_recipe(module.main, YAML, "test", args)
    finally:
        torch.set_num_threads(threads)
        for s, h in saved.items():
            signal.signal(s, h)


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` -> its sha256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def error_lines(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error") or "Traceback" in ln]


@pytest.fixture(autouse=True)
def zerokit_info(caplog):
    caplog.set_level(logging.INFO, logger="zerokit")  # "resumed from ..." is an info line


@pytest.fixture(scope="module")
def cache(tmp_path_factory, data_dir):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache):
    """A run trained to STEPS (checkpoints step_4, step_6), kept pristine: tests copy it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert pretrain(run_dir, cache) == 0
    return run_dir


@pytest.fixture(scope="module")
def longer(tmp_path_factory, cache):
    """The uninterrupted run to step 8: the losses every resumed run must reproduce."""
    run_dir = tmp_path_factory.mktemp("longer") / "run"
    assert pretrain(run_dir, cache, "train.max_steps=8") == 0
    return losses(run_dir)


def copy(run_dir: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(run_dir, dest)
    return dest


def test_final_checkpoint_with_a_manifest_that_matches_its_files(finished):
    root = finished / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_4", "step_6"]  # 6 is not a multiple of 4: the final one
    for ckpt in root.iterdir():
        manifest = json.loads((ckpt / "manifest.json").read_text())
        files = tree(ckpt)
        files.pop("manifest.json")
        assert {n: e["sha256"] for n, e in manifest["files"].items()} == files
        assert all(e["size"] == (ckpt / n).stat().st_size for n, e in manifest["files"].items())
        assert manifest["step"] == int(ckpt.name[5:]) and manifest["world_size"] == 1 and manifest["backend"] == "plain"
        assert manifest["config"]["data.block_size"] == 32 and manifest["config"]["model.preset"] == "gpt-tiny"
    assert json.loads((root / "step_6" / "trainer_state.json").read_text())["step"] == STEPS


def test_nothing_to_do_exits_0_and_changes_nothing(finished, cache, tmp_path, capsys):
    run_dir = copy(finished, tmp_path)
    before = tree(run_dir)
    assert pretrain(run_dir, cache) == 0
    out = capsys.readouterr().out.splitlines()
    assert [ln for ln in out if ln.startswith("nothing to do")] == [
        f"nothing to do: {run_dir} is at step {STEPS} = train.max_steps={STEPS}; "
        "raise train.max_steps or pass resume=none"]
    assert tree(run_dir) == before  # summary.json, sample.txt, metrics.jsonl, checkpoints: byte-identical


def test_damaged_newest_falls_back_to_the_older_and_keeps_it(finished, cache, longer, tmp_path, caplog):
    run_dir = copy(finished, tmp_path)
    shard = run_dir / "checkpoints" / "step_6" / "dcp" / "__0_0.distcp"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    damaged = tree(run_dir / "checkpoints" / "step_6")
    assert pretrain(run_dir, cache, "train.max_steps=8") == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"checkpoint {run_dir / 'checkpoints' / 'step_6'} is damaged" in w and "__0_0.distcp" in w
               for w in warnings), warnings
    assert any(f"resumed from {run_dir / 'checkpoints' / 'step_4'} at step 4" in r.getMessage() for r in caplog.records)
    assert tree(run_dir / "checkpoints" / "abandoned" / "step_6") == damaged  # moved aside, not deleted
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["abandoned", "step_4", "step_8"]
    got = losses(run_dir)
    assert {s: got[s] for s in range(5, 9)} == {s: longer[s] for s in range(5, 9)}


@pytest.mark.parametrize("override,key", [("data.block_size=64", "data.block_size=32"),
                                          ("model.preset=gpt-demo", "model.preset=gpt-tiny"),
                                          ("optim.name=lion", "optim.name=adamw")])
def test_shape_key_differs_exit_2_one_line(finished, cache, tmp_path, capsys, override, key):
    run_dir = copy(finished, tmp_path)
    before = tree(run_dir / "checkpoints")
    assert pretrain(run_dir, cache, "train.max_steps=8", override) == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and errors[0].startswith(f"error: checkpoint {run_dir / 'checkpoints' / 'step_6'} was "
                                                     f"written with {key} (this run: {override})"), errors
    assert tree(run_dir / "checkpoints") == before


def test_harmless_keys_may_change(finished, cache, longer, tmp_path):
    """lr, eval and step settings are not shape keys: resuming with another max_steps and eval size works."""
    run_dir = copy(finished, tmp_path)
    assert pretrain(run_dir, cache, "train.max_steps=8", "data.eval_batches=2", "train.log_every=2") == 0
    assert (run_dir / "checkpoints" / "step_8" / "manifest.json").is_file()


def test_explicit_older_resume_moves_the_newer_aside(finished, cache, longer, tmp_path, caplog):
    """resume=<step_4> moves step_6 aside; the next resume=auto continues the new line (step_5), not step_6."""
    run_dir = copy(finished, tmp_path)
    newer = tree(run_dir / "checkpoints" / "step_6")
    assert pretrain(run_dir, cache, "train.max_steps=5", f"resume={run_dir / 'checkpoints' / 'step_4'}") == 0
    assert tree(run_dir / "checkpoints" / "abandoned" / "step_6") == newer
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["abandoned", "step_4", "step_5"]
    caplog.clear()
    assert pretrain(run_dir, cache, "train.max_steps=8") == 0
    assert f"resumed from {run_dir / 'checkpoints' / 'step_5'} at step 5" in caplog.text
    got = losses(run_dir)
    assert {s: got[s] for s in range(5, 9)} == {s: longer[s] for s in range(5, 9)}


def test_checkpoint_without_manifest_still_loads(finished, cache, longer, tmp_path, caplog):
    """Checkpoints of earlier versions have no manifest and no format mark: they load, with a warning."""
    run_dir = copy(finished, tmp_path)
    for ckpt in (run_dir / "checkpoints").iterdir():
        (ckpt / "manifest.json").unlink()
        state = json.loads((ckpt / "trainer_state.json").read_text())
        state.pop("format")
        (ckpt / "trainer_state.json").write_text(json.dumps(state))
    assert pretrain(run_dir, cache, "train.max_steps=8") == 0
    assert "has no manifest" in caplog.text and f"resumed from {run_dir / 'checkpoints' / 'step_6'}" in caplog.text
    got = losses(run_dir)
    assert {s: got[s] for s in (7, 8)} == {s: longer[s] for s in (7, 8)}


def test_missing_manifest_of_a_new_checkpoint_is_damage(finished, cache, tmp_path, caplog):
    run_dir = copy(finished, tmp_path)
    (run_dir / "checkpoints" / "step_6" / "manifest.json").unlink()
    assert pretrain(run_dir, cache, "train.max_steps=7") == 0
    assert "manifest.json missing" in caplog.text and (run_dir / "checkpoints" / "abandoned" / "step_6").is_dir()


@pytest.fixture
def small_disk(tmp_path):
    """<tmp>/run/checkpoints on its own tmpfs (needs root: mount)."""
    mounted = []

    def mount(size: str) -> Path:
        ckpts = tmp_path / "run" / "checkpoints"
        ckpts.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(ckpts)], check=True)
        mounted.append(ckpts)
        return tmp_path / "run"
    yield mount
    for m in mounted:
        subprocess.run(["umount", str(m)], check=True)


def test_disk_full_on_the_first_save_removes_the_temp_folder(small_disk, cache, capsys):
    run_dir = small_disk("1m")  # a gpt-tiny checkpoint takes ~2 MB
    assert pretrain(run_dir, cache, "train.max_steps=2", "train.checkpoint_every=2") == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and "cannot write checkpoint step_2" in errors[0] and \
        "no older checkpoint exists" in errors[0], errors
    assert list((run_dir / "checkpoints").iterdir()) == []


@pytest.mark.parametrize("failure", ["disk_full", "read_only"])
def test_failed_save_keeps_the_previous_checkpoint(small_disk, cache, capsys, failure):
    run_dir = small_disk("3m" if failure == "disk_full" else "16m")  # disk_full: room for one checkpoint, not two
    assert pretrain(run_dir, cache, "train.max_steps=2", "train.checkpoint_every=2") == 0
    before = tree(run_dir / "checkpoints")
    if failure == "read_only":  # root ignores file modes, so a read-only mount stands in for "no permission"
        subprocess.run(["mount", "-o", "remount,ro", str(run_dir / "checkpoints")], check=True)
    capsys.readouterr()
    assert pretrain(run_dir, cache, "train.max_steps=4", "train.checkpoint_every=2") == 2
    errors = error_lines(capsys)
    reason = "No space left on device" if failure == "disk_full" else "Read-only file system"
    assert len(errors) == 1 and "cannot write checkpoint step_4" in errors[0] and reason in errors[0] and \
        "step_2 is intact" in errors[0], errors
    assert tree(run_dir / "checkpoints") == before
