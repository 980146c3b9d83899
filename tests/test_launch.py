"""Launch files without a cluster: the generated SLURM scripts, the committed ones, torchrun.sh, the
accelerate configs. What the scripts *do* under SLURM is tests/test_slurm.py (pytest -m slurm)."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from zerokit import launch
from zerokit.launch import JobSpec, render

REPO = Path(__file__).resolve().parents[1]

SPECS = {
    "cpu": JobSpec("recipes/pretrain_gpt.py", nodes=2, gpus_per_node=0, time="00:10:00"),
    "gpu": JobSpec("recipes/finetune_summarization.py", nodes=4, gpus_per_node=8, time="1-00:00:00",
                   account="def-someone", partition="gpu", cpus_per_task=32, mem="256G", signal_before=600,
                   recipe_args=["train.max_steps=10", "data.corpus=/scratch/my corpus/it's.txt"]),
}


def bash_n(text: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)


def cli(*argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zerokit.launch", *argv], cwd=cwd, text=True, capture_output=True)


@pytest.mark.parametrize("name", SPECS)
def test_generated_script_is_valid_bash(name):
    proc = bash_n(render(SPECS[name]))
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", sorted(launch.COMMITTED))
def test_committed_script_is_template_output(name):
    committed = (REPO / "launch" / "slurm" / name).read_text()
    assert committed == launch.committed_scripts()[name], \
        f"launch/slurm/{name} differs from the template: run `python -m zerokit.launch --regenerate`"
    assert bash_n(committed).returncode == 0


def test_no_stray_committed_scripts():
    on_disk = {p.name for p in (REPO / "launch" / "slurm").glob("*.sbatch")}
    assert on_disk == set(launch.COMMITTED), "every launch/slurm/*.sbatch must come from launch.COMMITTED"
    recipes = {Path(argv[-1]).stem for argv in launch.COMMITTED.values()}
    assert recipes == {"pretrain_gpt", "finetune_sentiment", "finetune_summarization"}


def test_rendezvous_lines():
    text = render(SPECS["gpu"])
    assert 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in text
    assert "export MASTER_PORT=$(( 15000 + SLURM_JOB_ID % 15000 ))" in text
    # SLURM_NODEID must be expanded on each node, i.e. inside srun's single-quoted command.
    srun = text[text.index("srun --kill-on-bad-exit=1 bash -c '"):]
    inner = srun.split("'")[1]
    assert '--nnodes "$SLURM_NNODES" --node_rank "$SLURM_NODEID" --nproc_per_node "$NPROC_PER_NODE"' in inner
    assert '--master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"' in inner
    assert "export NPROC_PER_NODE=8\n" in text
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=32", "#SBATCH --mem=256G", "#SBATCH --time=1-00:00:00",
                 "#SBATCH --account=def-someone", "#SBATCH --partition=gpu"):
        assert line + "\n" in text, line


def test_cpu_script_runs_one_gloo_rank_per_node():
    text = render(SPECS["cpu"])
    assert "export NPROC_PER_NODE=1\n" in text
    assert "--gpus-per-node" not in text.replace("--gpus-per-node 0", "")  # only in the header command
    assert "export DS_ACCELERATOR=cpu" in text
    assert "##SBATCH --account=" in text  # a hint, not an active line, when no account was given


def test_signal_requeue_and_offline_lines():
    text = render(SPECS["gpu"])
    for line in ("#SBATCH --signal=B:USR1@600", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1", "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}",
                 "export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1", 'scontrol requeue "$SLURM_JOB_ID"',
                 'rm -f "$RUN_DIR/PREEMPTED"', "# module load", "# source "):
        assert line in text, line
    trap = next(ln for ln in text.splitlines() if ln.startswith("trap "))
    assert trap.endswith(" USR1") and 'scancel --signal=USR1 "$SLURM_JOB_ID"' in trap
    assert 'trap "" USR1' in text  # torchrun must not die of the forwarded USR1
    assert '"run_dir=$RUN_DIR" resume=auto &' in text


def test_baked_recipe_args_survive_bash_quoting():
    text = render(SPECS["gpu"])
    set_line = next(ln for ln in text.splitlines() if ln.startswith("set -- "))
    out = subprocess.run(["bash", "-c", set_line + '\nprintf "%s\\n" "$@"', "x", "sbatch=arg"],
                         capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["train.max_steps=10", "data.corpus=/scratch/my corpus/it's.txt", "sbatch=arg"]


def test_cli_stdout_equals_output_file_and_header_command_reproduces_it(tmp_path):
    argv = ["--nodes", "2", "--gpus-per-node", "0", "--time", "00:05:00", "--cpus-per-task", "1",
            "recipes/pretrain_gpt.py", "--", "model.preset=gpt-tiny", "train.max_steps=7"]
    out = cli(*argv)
    assert out.returncode == 0, out.stderr
    assert cli(*argv, "-o", str(tmp_path / "a.sbatch")).returncode != 0  # -o after -- is a recipe arg: refused
    to_file = cli("-o", str(tmp_path / "a.sbatch"), *argv)
    assert to_file.returncode == 0 and to_file.stdout == ""
    assert (tmp_path / "a.sbatch").read_text() == out.stdout
    header = next(ln for ln in out.stdout.splitlines() if ln.startswith("#   zerokit slurm "))
    again = cli(*shlex.split(header[len("#   zerokit slurm "):]))
    assert again.stdout == out.stdout
    assert "set -- model.preset=gpt-tiny train.max_steps=7 \"$@\"" in out.stdout


def test_committed_header_commands_reproduce_the_files():
    for name, text in launch.committed_scripts().items():
        header = next(ln for ln in text.splitlines() if ln.startswith("#   zerokit slurm "))
        assert shlex.split(header)[3:] == launch.COMMITTED[name], name


R = "recipes/pretrain_gpt.py"


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "1", "--gpus-per-node", "1", "--time", "4h", R], "HH:MM:SS"),
    (["--nodes", "1", "--gpus-per-node", "1", "--time", "00:10:00", "--signal-before", "600", R],
     "below the time limit"),
    (["--nodes", "0", "--gpus-per-node", "1", "--time", "01:00:00", R], "at least 1 node"),
    (["--nodes", "1", "--gpus-per-node", "1", "--time", "01:00:00", R, "--", "resume=none"], "resume=auto"),
    (["--nodes", "1", "--gpus-per-node", "1", "--time", "01:00:00", R, "--", "max_steps"], "key=value"),
])
def test_cli_errors_are_one_line_and_status_2(argv, message):
    proc = cli(*argv)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_submit_without_sbatch_is_a_usage_error(tmp_path):
    env_path = tmp_path / "bin"
    env_path.mkdir()
    proc = subprocess.run([sys.executable, "-m", "zerokit.launch", "--nodes", "1", "--gpus-per-node", "0",
                           "--time", "00:10:00", "--submit", "recipes/pretrain_gpt.py"], cwd=REPO, text=True,
                          capture_output=True, env={"PATH": str(env_path), "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "sbatch not found" in proc.stderr, proc.stderr


def test_torchrun_sh():
    script = REPO / "launch" / "torchrun.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    for bad in ([], ["two", "recipes/pretrain_gpt.py"], ["2"]):
        proc = subprocess.run(["bash", str(script), *bad], capture_output=True, text=True)
        assert proc.returncode == 2 and "usage:" in proc.stderr


ACCELERATE = sorted((REPO / "launch" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))  # accelerate's own loader: rejects unknown keys
    ds_file = cfg.deepspeed_config.get("deepspeed_config_file")
    if cfg.distributed_type.value == "DEEPSPEED":
        assert ds_file and (REPO / ds_file).is_file(), ds_file
        json.loads((REPO / ds_file).read_text())
    assert re.search(r"^# .*accelerate launch --config_file launch/accelerate/" + path.name, path.read_text(), re.M)


def test_accelerate_configs_present():
    assert {p.name for p in ACCELERATE} >= {"single_process.yaml", "multi_cpu_2proc_deepspeed.yaml",
                                             "multi_gpu.yaml", "multi_gpu_deepspeed_zero2.yaml"}


@pytest.mark.slow
def test_accelerate_cpu_deepspeed_config_really_runs_two_ranks(tmp_path):
    """multi_cpu_2proc_deepspeed.yaml as a user would launch it: 2 ranks, the DeepSpeed backend (~1 min)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           "launch/accelerate/multi_cpu_2proc_deepspeed.yaml", "recipes/pretrain_gpt.py", "model.preset=gpt-tiny",
           "data.block_size=32", "data.vocab_size=512", "data.eval_batches=2", "train.max_steps=3",
           "train.eval_every=0", "sample.max_new_tokens=8", f"data.cache_dir={tmp_path / 'cache'}",
           f"run_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, text=True, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["backend"] == "deepspeed", summary
