"""A6: user errors give one clear line, exit status 2, no traceback."""
import json

import pytest

from launch_util import PRETRAIN, TINY, run
import sys


def _fails_cleanly(args, tmp_path, expect: str):
    proc = run([sys.executable, PRETRAIN, *TINY, "train.max_steps=1", f"run_dir={tmp_path / 'run'}", *args],
               check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert expect in err[0], err[0]
    return err[0]


def test_missing_corpus(tmp_path):
    line = _fails_cleanly([f"data.corpus={tmp_path / 'nope.txt'}"], tmp_path, "nope.txt")
    assert "not found" in line or "does not exist" in line


def test_unknown_key(tmp_path):
    _fails_cleanly(["train.learning_rate=1e-3"], tmp_path, "unknown config key 'train.learning_rate'")


def test_malformed_yaml(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train: {lr: 0.1\n")
    _fails_cleanly(["--config", str(cfg)], tmp_path, "malformed YAML")


def test_deepspeed_batch_size_contradiction(tmp_path, data_dir):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}))
    line = _fails_cleanly([f"ds_config={ds}", "train.micro_batch_size=8", "train.max_steps=1",
                           f"data.corpus={data_dir / 'tinyshakespeare' / 'input.txt'}"], tmp_path,
                          "train_micro_batch_size_per_gpu=4")
    assert "train.micro_batch_size=4" in line  # the fix is named


def test_debug_shows_the_traceback(tmp_path):
    proc = run([sys.executable, PRETRAIN, f"run_dir={tmp_path}", "train.nope=1", "--debug"], check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_unknown_packaged_ds_config_names_the_packaged_ones(tmp_path):
    line = _fails_cleanly(["ds_config=zero9"], tmp_path, "DeepSpeed config not found: zero9")
    assert "zero2_offload" in line and "ds_config=zero2" in line  # the names that do exist, and how to write one
