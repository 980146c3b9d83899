import pytest

from zerokit.config import load_config, parse_overrides
from zerokit.errors import UsageError

from launch_util import REPO

DEFAULTS = REPO / "recipes" / "configs" / "pretrain_gpt.yaml"
ZERO2 = REPO / "ds_configs" / "zero2.json"  # ds_config must name an existing JSON


def test_overrides_are_typed_and_nested():
    cfg = load_config(DEFAULTS, ["train.lr=1e-3", "train.max_steps=7", "model.grad_ckpt=true", f"ds_config={ZERO2}"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 7 and cfg.model.grad_ckpt is True and cfg.ds_config == str(ZERO2)
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}
    # text YAML would drop as a comment stays text; the spellings of null stay null
    assert parse_overrides(["p=#Person1#:", "q=null", "r=", "s=~"]) == {"p": "#Person1#:", "q": None, "r": None, "s": None}


def test_int_default_accepts_only_ints():
    with pytest.raises(UsageError, match="train.max_steps.*expects an int"):
        load_config(DEFAULTS, ["train.max_steps=lots"])


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(UsageError, match="unknown config key 'train.max_step'.*train.max_steps"):
        load_config(DEFAULTS, ["train.max_step=3"])


def test_user_yaml_layer(tmp_path):
    user = tmp_path / "u.yaml"
    user.write_text("train:\n  lr: 0.01\n")
    cfg = load_config(DEFAULTS, ["train.max_steps=2"], user)
    assert cfg.train.lr == 0.01 and cfg.train.max_steps == 2


def test_malformed_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(UsageError, match=r"malformed YAML in .*bad.yaml at line"):
        load_config(DEFAULTS, [], bad)
