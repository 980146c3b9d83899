"""`zerokit <command>` and `python -m zerokit`: the command table, every command's --help example,
`zerokit train` as a script and under torchrun, `zerokit configs`, packaged ds_config names, and the
summarization recipe's default base (warm-started once, in the cache, however many ranks ask)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch_util import BIN, TINY, env, losses, run
from zerokit.cli import COMMANDS, main
from zerokit.errors import UsageError
from zerokit.resources import DS_CONFIGS, find_ds_config

PY = [sys.executable, "-m", "zerokit"]


def zk(*argv: str, cwd: Path | None = None, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([*PY, *argv], cwd=cwd, env=env(**extra), text=True, capture_output=True, timeout=300)


def help_of(capsys, *argv: str) -> str:
    """`zerokit ARGV --help`, in this process (argparse's --help ends with SystemExit(0))."""
    try:
        status = main([*argv, "--help"])
    except SystemExit as e:
        status = e.code
    out = capsys.readouterr().out
    assert status in (0, None), out
    return out


def test_help_lists_every_command(capsys):
    listed = [line.split()[0] for line in help_of(capsys).splitlines() if line.startswith("  ") and line.split()]
    assert set(COMMANDS) <= set(listed) and {"train", "configs"} <= set(COMMANDS)


# The lab's commands (estimate, plan, bench, verify, memtest) get theirs from the lab's parsers.
@pytest.mark.parametrize("command", ["train", "configs", "export", "warm-start", "generate", "slurm"])
def test_help_shows_an_example(capsys, command):
    out = help_of(capsys, command)
    example = out[out.index("example"):]
    assert f"zerokit {command}" in example or "-m zerokit" in example, out


def test_train_recipe_help_names_the_command(capsys):
    out = help_of(capsys, "train", "pretrain_gpt")
    assert "usage: zerokit train pretrain_gpt" in out and "example" in out


@pytest.mark.parametrize("argv, message", [
    (["train", "pretrain_gtp"], "unknown recipe 'pretrain_gtp'; choose one of"),
    (["train", "pretrain_gpt", "train.nope=1"], "unknown config key 'train.nope'"),
    (["nope"], "unknown command 'nope'"),
])
def test_errors_are_one_line_and_status_2(argv, message):
    out = zk(*argv)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1 and message in errors[0], out.stderr
    assert "Traceback" not in out.stderr


def test_ds_config_rule(tmp_path):
    """An existing path wins; else zero2, zero2.json or ds_configs/zero2.json name the packaged JSON."""
    zero2 = str(DS_CONFIGS / "zero2.json")
    assert find_ds_config("zero2") == find_ds_config("zero2.json") == zero2
    probe = ["-c", "from zerokit.resources import find_ds_config; print(find_ds_config('ds_configs/zero2.json'))"]
    here = subprocess.run([sys.executable, *probe], cwd=tmp_path, env=env(), text=True, capture_output=True)
    assert here.stdout.strip() == zero2, here.stderr  # no ds_configs/ in the working directory
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "zero2.json").write_text("{}")
    mine = subprocess.run([sys.executable, *probe], cwd=tmp_path, env=env(), text=True, capture_output=True)
    assert mine.stdout.strip() == "ds_configs/zero2.json", mine.stderr  # the user's own copy
    with pytest.raises(UsageError, match="packaged name"):
        find_ds_config(str(tmp_path / "zero2_typo.json"))


def test_configs_refuses_to_overwrite_and_copies_nothing_then(tmp_path):
    (tmp_path / "c" / "ds_configs").mkdir(parents=True)
    (tmp_path / "c" / "ds_configs" / "zero2.json").write_text("mine")
    out = zk("configs", "c", cwd=tmp_path)
    assert out.returncode == 2 and "not overwriting" in out.stderr, out.stderr
    assert (tmp_path / "c" / "ds_configs" / "zero2.json").read_text() == "mine"
    assert not (tmp_path / "c" / "recipes").exists()


def pretrain_args(tmp_path: Path, data_dir: Path) -> list[str]:
    return [*TINY, "train.max_steps=2", f"data.cache_dir={tmp_path / 'cache'}",
            f"data.corpus={data_dir / 'tinyshakespeare' / 'input.txt'}"]


TORCHRUN = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"]


def test_torchrun_module_train_runs_two_ranks(tmp_path, data_dir):
    run([*TORCHRUN, "-m", "zerokit", "train", "pretrain_gpt", *pretrain_args(tmp_path, data_dir),
         f"run_dir={tmp_path / 'run'}"])
    assert sorted(losses(tmp_path / "run")) == [1, 2]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["world_size"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_module_train_under_a_launcher_matches_the_recipe_script(tmp_path, data_dir, launcher):
    """`<launcher> -m zerokit train pretrain_gpt` on 2 ranks runs the same recipe as `<launcher>
    recipes/pretrain_gpt.py`: the same losses, step for step."""
    cmd = TORCHRUN if launcher == "torchrun" else [
        str(BIN / "accelerate"), "launch", "--num_processes", "2", "--num_machines", "1", "--multi_gpu",
        "--mixed_precision", "no", "--dynamo_backend", "no"]
    args = pretrain_args(tmp_path, data_dir)
    run([*cmd, "-m", "zerokit", "train", "pretrain_gpt", *args, f"run_dir={tmp_path / 'module'}"])
    run([*cmd, "recipes/pretrain_gpt.py", *args, f"run_dir={tmp_path / 'script'}"])
    a, b = losses(tmp_path / "module"), losses(tmp_path / "script")
    assert len(a) == 2 and a == b, (a, b)
    assert json.loads((tmp_path / "module" / "summary.json").read_text())["world_size"] == 2


WORKER = """
import logging, sys
logging.basicConfig(level=logging.INFO)
from pathlib import Path
from zerokit.recipe import cached_warm_start
print(cached_warm_start("warm-start:minilm", Path(sys.argv[1])))
"""


def test_default_summarization_base_is_written_once_for_concurrent_ranks(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path)], env=env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    paths = {o.strip().splitlines()[-1] for o, _ in outs}
    assert len(paths) == 1
    base = Path(paths.pop())
    assert (base / "config.json").is_file() and (base / "tokenizer_config.json").is_file()
    assert json.loads((base / "config.json").read_text())["is_decoder"] is True
    assert sum("writing the base" in err for _, err in outs) == 1, outs  # one writer, the other waited
    assert not base.with_name(base.name + ".tmp").exists()


@pytest.mark.slow
def test_summarization_defaults_work_on_a_fresh_home(tmp_path, data_dir):
    """The documented `python recipes/finetune_summarization.py` with only step counts changed, HOME empty."""
    d = data_dir / "dialogsum"
    out = zk("train", "finetune_summarization", f"data.train={d / 'train.jsonl'}", f"data.validation={d / 'dev.jsonl'}",
             "train.max_steps=1", "eval.max_samples=2", "eval.max_new_tokens=8", "train.micro_batch_size=2",
             f"run_dir={tmp_path / 'run'}", cwd=tmp_path, HOME=tmp_path / "home")
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {"rouge1", "rouge2", "rougeL"} <= set(summary)
    assert (tmp_path / "home" / ".cache" / "zerokit" / "warm_start" / "minilm-causal-lm" / "config.json").is_file()
