"""`pip install .` (not editable) without the repository: the wheel carries the recipes, their YAMLs and the
DeepSpeed JSONs, and an installed `zerokit train` pre-trains from a folder that is not a checkout.

The wheel goes into a fresh venv (--no-deps) that sees the installed dependencies through a .pth line
naming the project venv's site-packages; Python does not process .pth files of a directory added that
way, so the project venv's editable zerokit is not on the path, and the test checks that it is not."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from launch_util import REPO, TINY, env

RECIPES = {"pretrain_gpt", "finetune_sentiment", "finetune_summarization"}


def sh(cmd: list, cwd: Path, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, text=True, capture_output=True, timeout=timeout, **kw)
    assert proc.returncode == 0, f"{cmd}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy of what the package is made of, so the checkout gets no build/ or egg-info.
    src = tmp / "src"
    shutil.copytree(REPO / "zerokit", src / "zerokit", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    sh([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", src], tmp)
    wheel = next((tmp / "dist").glob("zerokit-*.whl"))

    venv = tmp / "venv"
    sh([sys.executable, "-m", "venv", "--without-pip", venv], tmp)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    # No PYTHONPATH: nothing may come from the checkout (pip would also take a zerokit.egg-info found
    # through it for an installed zerokit and skip the wheel).
    e = {k: v for k, v in env().items() if k != "PYTHONPATH"}
    sh([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps", "-q", wheel], tmp, env=e)
    e["PATH"] = f"{venv / 'bin'}:{e['PATH']}"
    work = tmp / "work"
    work.mkdir()
    return {"wheel": wheel, "venv": venv, "env": e, "work": work, "site": site}


def test_wheel_holds_recipes_and_configs(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    for r in RECIPES:
        assert f"zerokit/recipes/{r}.py" in names and f"zerokit/recipes/configs/{r}.yaml" in names, r
    shipped = {Path(n).name for n in names if n.startswith("zerokit/ds_configs/")}
    assert shipped >= {p.name for p in (REPO / "zerokit" / "ds_configs").glob("*.json")}
    assert "zerokit/__main__.py" in names and "zerokit/assets/tinyshakespeare.txt" in names


def test_installed_zerokit_is_the_wheel(installed):
    out = sh([installed["venv"] / "bin" / "python", "-c", "import zerokit, sys; print(zerokit.__file__)"],
             installed["work"], env=installed["env"]).stdout.strip()
    assert Path(out).is_relative_to(installed["site"]), out
    help_ = sh(["zerokit", "--help"], installed["work"], env=installed["env"]).stdout
    assert "train" in help_ and "configs" in help_


def test_installed_train_pretrains_outside_the_repo(installed, data_dir):
    """5 steps of `zerokit train pretrain_gpt` on ZeRO-1 named as ds_configs/zero1.json from a folder that
    has no ds_configs/ (the packaged JSON): every step logged, the loss falls, the checkpoint is complete."""
    work, run_dir = installed["work"], installed["work"] / "run"
    args = [*TINY, "train.max_steps=5", "train.checkpoint_every=5", f"run_dir={run_dir}",
            f"data.cache_dir={work / 'cache'}", f"data.corpus={data_dir / 'tinyshakespeare' / 'input.txt'}", "ds_config=ds_configs/zero1.json"]
    sh(["zerokit", "train", "pretrain_gpt", *args], work, env=installed["env"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 5 and losses[-1] < losses[0], losses
    ckpt = run_dir / "checkpoints" / "step_5"
    assert (ckpt / "trainer_state.json").is_file() and (ckpt / "model" / "config.json").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 5 and summary["backend"] == "deepspeed", summary
    assert (ckpt / "deepspeed").is_dir()


def test_installed_configs_copies_and_refuses_to_overwrite(installed):
    work = installed["work"]
    sh([installed["venv"] / "bin" / "python", "-m", "zerokit", "configs", "cfgs"], work, env=installed["env"])
    packaged = {p.name for p in (REPO / "zerokit" / "recipes" / "configs").glob("*.yaml")}
    assert {p.name for p in (work / "cfgs" / "recipes").iterdir()} == packaged >= {f"{r}.yaml" for r in RECIPES}
    # a copied recipe YAML loads as --config (its base YAMLs came along), and an edit in it is read
    edited = work / "cfgs" / "recipes" / "finetune_sentiment.yaml"
    edited.write_text(edited.read_text().replace("run_dir: runs/finetune_sentiment", "run_dir: edited"))
    probe = ("from zerokit.config import load_config; from zerokit.resources import RECIPE_CONFIGS as C; "
             "print(load_config(C / 'finetune_sentiment.yaml', [], 'cfgs/recipes/finetune_sentiment.yaml').run_dir)")
    out = sh([installed["venv"] / "bin" / "python", "-c", probe], work, env=installed["env"]).stdout
    assert out.strip() == "edited"
    for p in (REPO / "zerokit" / "ds_configs").glob("*.json"):
        assert (work / "cfgs" / "ds_configs" / p.name).read_text() == p.read_text()
    again = subprocess.run(["zerokit", "configs", "cfgs"], cwd=work, env=installed["env"], text=True,
                           capture_output=True)
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1, again.stderr
    assert "not overwriting" in again.stderr
