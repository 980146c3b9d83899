"""Launch files without a cluster: the generated SLURM scripts (run with bash under SLURM's variables, with
stubs for srun/scontrol/scancel/torchrun that record what they were asked to do), the committed ones,
torchrun.sh, the accelerate configs. The same scripts on a real (local) cluster: tests/test_slurm.py (-m slurm)."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zerokit import launch
from zerokit.launch import JobSpec, render

REPO = Path(__file__).resolve().parents[1]

SPECS = {
    "cpu": JobSpec("pretrain_gpt", nodes=2, gpus_per_node=0, time="00:10:00"),
    "gpu": JobSpec("finetune_summarization", nodes=4, gpus_per_node=8, time="1-00:00:00",
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


# ---- what the script does: run with bash, SLURM's variables set, stub srun/scontrol/scancel/torchrun on PATH

STUB_TORCHRUN = """#!{python}
# Records what it was started with; then exits with STUB_EXIT, or (STUB_EXIT=wait) waits for USR1 as a rank
# does: it writes <run_dir>/PREEMPTED (the step) and exits 0. Python may handle USR1 though the script's
# `trap "" USR1` made it ignored here, as the real ranks do.
import json, os, signal, sys, time
log = os.environ["STUB_LOG"]
keep = ("NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "HF_HUB_OFFLINE", "DS_ACCELERATOR",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING", "SRUN_CPUS_PER_TASK")
json.dump({{"argv": sys.argv[1:], "env": {{k: os.environ.get(k) for k in keep}}}}, open(log + "/torchrun.json", "w"))
run_dir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("run_dir="))
def preempted(*_):
    open(run_dir + "/PREEMPTED", "w").write("3")
    sys.exit(0)
signal.signal(signal.SIGUSR1, preempted)
open(log + "/torchrun.pid", "w").write(str(os.getpid()))
if os.environ["STUB_EXIT"] != "wait":
    sys.exit(int(os.environ["STUB_EXIT"]))
time.sleep(60)
sys.exit(9)
"""
STUBS = {
    # srun: record its arguments, drop its own options, run the command (here: on "this" node only)
    "srun": 'printf "%s\\n" "$@" > "$STUB_LOG/srun.args"\nwhile [[ $1 == -* ]]; do shift; done\nexec "$@"\n',
    "scontrol": 'case $1 in show) printf "n1\\nn2\\n" ;; *) echo "$@" >> "$STUB_LOG/scontrol.log" ;; esac\n',
    # scancel --signal=USR1 JOB: deliver it to the job's processes, here the stub rank
    "scancel": 'echo "$@" >> "$STUB_LOG/scancel.log"\nkill -USR1 "$(cat "$STUB_LOG/torchrun.pid")"\n',
}
SLURM_ENV = {"SLURM_JOB_ID": "1234", "SLURM_JOB_NAME": "job", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NNODES": "2",
             "SLURM_NODEID": "1", "SLURM_CPUS_PER_TASK": "32"}


def batch_env(tmp_path: Path, stub_exit: str = "0") -> dict:
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    (bin_ / "torchrun").write_text(STUB_TORCHRUN.format(python=sys.executable))
    for name, body in STUBS.items():
        (bin_ / name).write_text("#!/bin/bash\n" + body)
    for f in bin_.iterdir():
        f.chmod(0o755)
    return {"PATH": f"{bin_}:/usr/bin:/bin", "STUB_LOG": str(tmp_path), "STUB_EXIT": stub_exit, **SLURM_ENV}


def sbatch_locally(spec: JobSpec, tmp_path: Path, *args: str, stub_exit: str = "0") -> subprocess.CompletedProcess:
    """The script as the batch step runs it: bash, in the submit folder, with sbatch's trailing arguments."""
    script = tmp_path / "job.sbatch"
    script.write_text(render(spec))
    return subprocess.run(["bash", str(script), *args], cwd=tmp_path, env=batch_env(tmp_path, stub_exit), text=True,
                          capture_output=True, timeout=60)


def started(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "torchrun.json").read_text())


def test_script_starts_torchrun_with_this_nodes_rank_and_the_rendezvous(tmp_path):
    proc = sbatch_locally(SPECS["gpu"], tmp_path, "train.lr=0.1", "run_dir=custom", "resume=none")
    assert proc.returncode == 0, proc.stderr
    assert "ignoring resume=none" in proc.stderr
    run = started(tmp_path)
    port = str(15000 + 1234 % 15000)
    assert run["argv"] == ["--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "8", "--master_addr", "n1",
                           "--master_port", port, "-m", "zerokit", "train", "finetune_summarization",
                           "train.max_steps=10", "data.corpus=/scratch/my corpus/it's.txt", "train.lr=0.1",
                           "run_dir=custom", "resume=auto"]
    assert run["env"] == {"NPROC_PER_NODE": "8", "MASTER_ADDR": "n1", "MASTER_PORT": port, "OMP_NUM_THREADS": "4",
                          "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": None, "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
                          "SRUN_CPUS_PER_TASK": "32"}
    assert (tmp_path / "srun.args").read_text().splitlines()[0] == "--kill-on-bad-exit=1"
    assert (tmp_path / "custom").is_dir() and not (tmp_path / "scontrol.log").exists()  # finished: no requeue


def test_cpu_script_runs_one_gloo_rank_per_node_and_passes_the_exit_status(tmp_path):
    run_dir = tmp_path / "runs" / "job-1234"  # the default: one per job id, kept across requeues
    run_dir.mkdir(parents=True)
    (run_dir / "PREEMPTED").write_text("7")  # left by an earlier attempt: must not requeue a failed run
    proc = sbatch_locally(SPECS["cpu"], tmp_path, stub_exit="3")
    assert proc.returncode == 3, proc.stderr
    run = started(tmp_path)
    assert run["argv"][run["argv"].index("--nproc_per_node") + 1] == "1"
    assert run["env"]["DS_ACCELERATOR"] == "cpu"
    assert run["argv"][-2:] == ["run_dir=runs/job-1234", "resume=auto"]
    assert not (tmp_path / "scontrol.log").exists() and not (run_dir / "PREEMPTED").exists()


def test_usr1_checkpoints_every_rank_then_requeues(tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text(render(SPECS["cpu"]))
    proc = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=batch_env(tmp_path, "wait"), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not (tmp_path / "torchrun.pid").exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGUSR1)  # what SLURM sends the batch shell (--signal=B:USR1@...)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert (tmp_path / "scancel.log").read_text().split() == ["--signal=USR1", "1234"]  # forwarded to the ranks
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "1234"]
    assert "stopped early at step 3" in out


def test_packaged_recipe_needs_no_checkout_and_a_script_path_is_run_as_given(tmp_path):
    assert str(REPO) not in render(SPECS["gpu"])
    mine = JobSpec("my/train.py", nodes=1, gpus_per_node=0, time="00:10:00")
    missing = sbatch_locally(mine, tmp_path)
    assert missing.returncode == 2 and "my/train.py not found in" in missing.stderr
    (tmp_path / "my").mkdir()
    (tmp_path / "my" / "train.py").write_text("")
    assert sbatch_locally(mine, tmp_path).returncode == 0
    assert started(tmp_path)["argv"][-3:] == ["my/train.py", "run_dir=runs/job-1234", "resume=auto"]


def test_sbatch_directives():
    """What SLURM itself reads: the #SBATCH lines."""
    directives = [ln.split(None, 1)[1] for ln in render(SPECS["gpu"]).splitlines() if ln.startswith("#SBATCH ")]
    assert directives == ["--job-name=finetune_summarization", "--nodes=4", "--ntasks-per-node=1",
                          "--gpus-per-node=8", "--cpus-per-task=32", "--mem=256G", "--account=def-someone",
                          "--partition=gpu", "--time=1-00:00:00", "--signal=B:USR1@600", "--requeue",
                          "--open-mode=append", "--output=%x-%j.out"]
    cpu = [ln for ln in render(SPECS["cpu"]).splitlines() if ln.startswith("#SBATCH --")]
    assert not any("gpus" in ln or "--account" in ln for ln in cpu)  # no GPUs; the account only as a hint
    assert "#SBATCH --signal=B:USR1@300" in cpu  # min(300 s, half the limit)


@pytest.mark.parametrize("recipe, expect", [("pretrain_gpt", "pretrain_gpt"), ("recipes/pretrain_gpt.py", "pretrain_gpt"),
                                             (str(REPO / "tests" / "slurm" / "signal_probe.py"), "signal_probe.py")])
def test_recipe_spellings(recipe, expect):
    ns = launch.parser().parse_args(["--nodes", "1", "--gpus", "0", "--time", "00:10:00", recipe])
    assert launch.spec_from_args(ns).recipe.endswith(expect)


def test_cli_stdout_equals_output_file_and_header_command_reproduces_it(tmp_path):
    argv = ["--nodes", "2", "--gpus", "0", "--time", "00:05:00", "--cpus-per-task", "1",
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
    (["--nodes", "1", "--gpus", "1", "--time", "4h", R], "HH:MM:SS"),
    (["--nodes", "1", "--gpus", "1", "--time", "00:10:00", "--signal-before", "600", R],
     "below the time limit"),
    (["--nodes", "0", "--gpus", "1", "--time", "01:00:00", R], "at least 1 node"),
    (["--nodes", "1", "--gpus", "1", "--time", "01:00:00", R, "--", "resume=none"], "resume=auto"),
    (["--nodes", "1", "--gpus", "1", "--time", "01:00:00", R, "--", "max_steps"], "key=value"),
    (["--nodes", "1", "--time", "01:00:00", R], "--gpus N is required"),
    (["--nodes", "1", "--gpus", "1", "--time", "01:00:00", "recipes/pretrain_gtp.py"], "pretrain_gpt"),
])
def test_cli_errors_are_one_line_and_status_2(argv, message):
    proc = cli(*argv)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_old_gpus_per_node_spelling_still_works():
    new, old = (cli("--nodes", "1", flag, "2", "--time", "01:00:00", "pretrain_gpt") for flag in ("--gpus", "--gpus-per-node"))
    assert new.returncode == old.returncode == 0 and new.stdout == old.stdout
    assert "--gpus-per-node" not in cli("--help").stdout  # hidden: one spelling in the help


def test_submit_without_sbatch_is_a_usage_error(tmp_path):
    env_path = tmp_path / "bin"
    env_path.mkdir()
    proc = subprocess.run([sys.executable, "-m", "zerokit.launch", "--nodes", "1", "--gpus", "0",
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
