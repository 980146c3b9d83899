"""SLURM batch scripts for the recipes, all from one template.

    zerokit slurm --nodes 2 --gpus 4 --time 04:00:00 pretrain_gpt -- train.max_steps=5000
    python -m zerokit.launch --regenerate [launch/slurm]   # (in the checkout) rewrite the committed scripts

The script runs one `torchrun` per node under `srun`; torchrun starts one rank per GPU (one per node with
--gpus 0, on gloo). A packaged recipe (NAME or recipes/NAME.py) runs as `torchrun ... -m zerokit train NAME`,
so the script needs an installed zerokit, not a checkout; any other path is a script of yours, run as given. It always passes `run_dir=... resume=auto`, and on USR1 (sent by SLURM
--signal seconds before the time limit, or by you: `scancel --batch --signal=USR1 JOBID`) it has every
rank checkpoint and stop, then requeues itself; the requeued job resumes from the newest checkpoint.
The template's comments explain each step, so a generated script reads on its own.
"""
from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from zerokit.errors import UsageError
from zerokit.resources import recipe_names

SIGNAL_BEFORE_S = 300  # USR1 this long before the time limit (at most half of it): time to finish a step and save

# The committed scripts in launch/slurm/ are exactly `zerokit slurm <these args>` (tests/test_launch.py checks).
COMMITTED = {
    "pretrain_gpt.sbatch": ["--nodes", "2", "--gpus", "4", "--time", "12:00:00", "pretrain_gpt"],
    "finetune_sentiment.sbatch": ["--nodes", "1", "--gpus", "2", "--time", "02:00:00", "finetune_sentiment"],
    "finetune_summarization.sbatch": ["--nodes", "1", "--gpus", "4", "--time", "06:00:00", "finetune_summarization"],
}

# {{name}} placeholders (bash itself never writes "{{"). Everything else is literal bash.
TEMPLATE = r"""#!/bin/bash
# {{title}}
# Generated from the template in zerokit/launch.py; to change it, regenerate rather than edit:
#   {{command}}
# Submit from the folder runs/ should go in; key=value arguments after the script name go to the recipe:
#   sbatch {{script}} [key=value ...]
#SBATCH --job-name={{job_name}}
#SBATCH --nodes={{nodes}}
#SBATCH --ntasks-per-node=1
{{resources}}
#SBATCH --time={{time}}
#SBATCH --signal=B:USR1@{{signal_s}}
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
# One task per node: it runs torchrun, which starts that node's {{nproc}} rank(s). --signal sends USR1 to
# this shell (B:) {{signal_s}} s before the time limit; --requeue allows `scontrol requeue` (and requeue
# after a node failure); --open-mode=append keeps one log across requeues.

# No `set -e`: the wait/trap logic below reads exit statuses itself.
set -uo pipefail

# Software (a Compute Canada-style cluster; uncomment and adapt):
# module load StdEnv/2023 python/3.11 cuda/12.2
# source ~/venvs/zerokit/bin/activate

{{recipe}}
export NPROC_PER_NODE={{nproc}}

# Rendezvous at the first node of the allocation. The port comes from the job id: two jobs sharing a node
# get different ports, a requeued job (same id) the same one; 15000-29999 stays below Linux's ephemeral
# range (32768+), where an outgoing connection could already hold it.
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$(( 15000 + SLURM_JOB_ID % 15000 ))

# Turn hangs into errors: a failed or stuck collective aborts the process group, torchrun exits non-zero
# and srun --kill-on-bad-exit stops the other nodes, instead of everything idling until the time limit.
# The collective timeout itself is the recipe's train.dist_timeout_s (given to init_process_group); the
# heartbeat kills a rank whose NCCL watchdog thread is itself stuck.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC=${TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC:-600}
# NCCL's own log: `NCCL_DEBUG=INFO sbatch ...` shows the rings and transports it picked.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
{{device_env}}

# Compute nodes often have no internet: models, tokenizers and datasets come from the local HF cache only
# (fill it on a login node first).
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

# Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch; pass it on, and split it between
# the ranks of a node (torchrun would otherwise set 1 thread each).
export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
threads=$(( SRUN_CPUS_PER_TASK / NPROC_PER_NODE ))
export OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 ))

# Recipe arguments: those given to `zerokit slurm` after --, then those given to sbatch after the script.
{{set_args}}
# run_dir defaults to one per job id, which a requeued job keeps, so it resumes its own run.
RUN_DIR=runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}
args=()
for arg in "$@"; do
  case $arg in
    run_dir=*) RUN_DIR=${arg#run_dir=} ;;
    resume=*) echo "ignoring $arg: this script always passes resume=auto" >&2 ;;
    *) args+=("$arg") ;;
  esac
done
mkdir -p "$RUN_DIR"
# The loop writes PREEMPTED when a signal stopped it early; one left from the last attempt would requeue
# a run that finished.
rm -f "$RUN_DIR/PREEMPTED"
echo "job $SLURM_JOB_ID, attempt $(( ${SLURM_RESTART_COUNT:-0} + 1 )): $SLURM_NNODES node(s) [$SLURM_JOB_NODELIST]" \
  "x $NPROC_PER_NODE rank(s), rendezvous $MASTER_ADDR:$MASTER_PORT, run_dir=$RUN_DIR"

# Preemption and time limit. USR1 reaches only this shell; forward it to every process of the job's steps
# (scancel --signal without --batch/--full leaves this shell out). That includes torchrun, whose default
# action for USR1 would be to die, so torchrun runs with USR1 ignored (below); each rank installs its own
# handler, finishes its step, writes a checkpoint and PREEMPTED, and exits 0. Then we requeue.
interrupted=0
trap 'interrupted=1; echo "USR1: asking every rank to checkpoint and stop"; scancel --signal=USR1 "$SLURM_JOB_ID"' USR1

# One torchrun per node. The single-quoted command is expanded on each node (SLURM_NODEID differs there);
# `trap "" USR1` makes torchrun ignore USR1, and its ranks inherit that until they set a handler.
# srun runs in the background because bash runs a trap only between commands or during `wait`.
srun --kill-on-bad-exit=1 bash -c '
  trap "" USR1
  exec torchrun --nnodes "$SLURM_NNODES" --node_rank "$SLURM_NODEID" --nproc_per_node "$NPROC_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$@"' \
  torchrun "${RECIPE[@]}" "${args[@]}" "run_dir=$RUN_DIR" resume=auto &
srun_pid=$!
wait "$srun_pid"; status=$?
# A trapped signal makes `wait` return at once (status 138); wait again for srun's own exit status.
while [ "$interrupted" = 1 ]; do interrupted=0; wait "$srun_pid"; status=$?; done

if [ -f "$RUN_DIR/PREEMPTED" ]; then
  echo "stopped early at step $(cat "$RUN_DIR/PREEMPTED"); requeueing job $SLURM_JOB_ID (it resumes from the checkpoint)"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
echo "training exited with status $status"
exit "$status"
"""

RECIPE_PACKAGED = """\
# zerokit's packaged recipe (`zerokit train {name}`), from the Python environment torchrun runs in.
RECIPE=(-m zerokit train {name})"""
RECIPE_SCRIPT = """\
RECIPE=({path})
if [ ! -f "${{RECIPE[0]}}" ]; then
  echo "${{RECIPE[0]}} not found in $PWD: submit from the folder it is relative to (or sbatch --chdir=DIR)" >&2
  exit 2
fi"""

DEVICE_ENV_CPU = """\
# No GPUs: one CPU rank per node; torch.distributed uses gloo, DeepSpeed its CPU accelerator.
export DS_ACCELERATOR=cpu"""
DEVICE_ENV_GPU = """\
# GPUs: one rank per GPU, NCCL between them."""


@dataclass
class JobSpec:
    """Everything a batch script depends on; `render` turns it into the script."""

    recipe: str  # a packaged recipe's name (pretrain_gpt), else the path of a script
    nodes: int
    gpus_per_node: int
    time: str
    account: str | None = None
    partition: str | None = None
    cpus_per_task: int | None = None  # default: 4 per rank
    mem: str | None = None
    signal_before: int | None = None  # default: SIGNAL_BEFORE_S, or half the time limit if shorter
    recipe_args: list[str] = field(default_factory=list)

    @property
    def packaged(self) -> bool:
        return self.recipe in recipe_names()

    @property
    def nproc_per_node(self) -> int:
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    def command(self) -> str:
        """The `zerokit slurm` command that renders this spec (recorded in the script's header)."""
        argv = ["zerokit", "slurm", "--nodes", str(self.nodes), "--gpus", str(self.gpus_per_node),
                "--time", self.time]
        for flag, value in (("--account", self.account), ("--partition", self.partition),
                            ("--cpus-per-task", self.cpus_per_task), ("--mem", self.mem)):
            if value is not None:
                argv += [flag, str(value)]
        if self.signal_before is not None:
            argv += ["--signal-before", str(self.signal_before)]
        argv.append(self.recipe)
        if self.recipe_args:
            argv += ["--", *self.recipe_args]
        return shlex.join(argv)


def time_limit_seconds(text: str) -> int:
    """Seconds in a SLURM time limit written [D-]HH:MM:SS."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+):([0-5]\d):([0-5]\d)", text)
    if not m:
        raise UsageError(f"--time {text!r}: write it as HH:MM:SS or D-HH:MM:SS, e.g. --time 04:00:00")
    days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def signal_seconds(spec: JobSpec) -> int:
    if spec.signal_before is not None:
        return spec.signal_before
    return min(SIGNAL_BEFORE_S, time_limit_seconds(spec.time) // 2)


def validate(spec: JobSpec) -> None:
    if spec.nodes < 1:
        raise UsageError(f"--nodes {spec.nodes}: need at least 1 node")
    if spec.gpus_per_node < 0:
        raise UsageError(f"--gpus {spec.gpus_per_node}: use 0 for CPU nodes, else the GPUs per node")
    if spec.cpus_per_task is not None and spec.cpus_per_task < 1:
        raise UsageError(f"--cpus-per-task {spec.cpus_per_task}: need at least 1")
    limit = time_limit_seconds(spec.time)
    if not 0 < signal_seconds(spec) < min(limit, 65536):
        raise UsageError(f"--signal-before {signal_seconds(spec)}: must be above 0 and below the time limit "
                         f"({limit} s) and 65536 (SLURM's maximum)")
    for arg in spec.recipe_args:
        if "=" not in arg or arg.startswith("="):
            raise UsageError(f"recipe argument {arg!r}: write recipe settings as key=value (after --)")
        if arg.startswith("resume="):
            raise UsageError(f"{arg}: the batch script always passes resume=auto (it resumes its own run_dir "
                             "after a requeue); copy a checkpoint into <run_dir>/checkpoints/ to start from it")


def render(spec: JobSpec, script: str = "THIS_SCRIPT") -> str:
    """The batch script for `spec` (the single template every script comes from); `script` is the name
    its header tells you to sbatch."""
    validate(spec)
    name = Path(spec.recipe).stem
    cpus = spec.cpus_per_task if spec.cpus_per_task is not None else 4 * spec.nproc_per_node
    resources = []
    if spec.gpus_per_node > 0:
        resources.append(f"#SBATCH --gpus-per-node={spec.gpus_per_node}")
    resources.append(f"#SBATCH --cpus-per-task={cpus}")
    if spec.mem is not None:
        resources.append(f"#SBATCH --mem={spec.mem}")
    resources.append(f"#SBATCH --account={spec.account}" if spec.account
                     else "##SBATCH --account=def-yourpi   # required on Compute Canada: uncomment, name your allocation")
    if spec.partition:
        resources.append(f"#SBATCH --partition={spec.partition}")
    if spec.recipe_args:
        set_args = f'set -- {" ".join(shlex.quote(a) for a in spec.recipe_args)} "$@"'
    else:
        set_args = "# (none given to zerokit slurm)"
    nodes = f"{spec.nodes} node{'s' if spec.nodes > 1 else ''}"
    per_node = f"{spec.gpus_per_node} GPU{'s' if spec.gpus_per_node > 1 else ''}" if spec.gpus_per_node \
        else "1 CPU process"
    values = {
        "title": f"{name} on {nodes} x {per_node} per node: srun starts one torchrun per node.",
        "command": spec.command(),
        "script": script,
        "job_name": name,
        "nodes": str(spec.nodes),
        "resources": "\n".join(resources),
        "time": spec.time,
        "signal_s": str(signal_seconds(spec)),
        "nproc": str(spec.nproc_per_node),
        "recipe": RECIPE_PACKAGED.format(name=name) if spec.packaged else RECIPE_SCRIPT.format(path=shlex.quote(spec.recipe)),
        "device_env": DEVICE_ENV_GPU if spec.gpus_per_node else DEVICE_ENV_CPU,
        "set_args": set_args,
    }
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], TEMPLATE)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zerokit slurm",
        description="Write a SLURM batch script that trains RECIPE on N nodes x G GPUs (to stdout or -o FILE), "
                    "with checkpoint-and-requeue on USR1 before the time limit.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  zerokit slurm --nodes 2 --gpus 4 --time 04:00:00 --account def-me pretrain_gpt -- train.max_steps=5000\n"
               "  zerokit slurm --nodes 1 --gpus 2 --time 02:00:00 -o sst2.sbatch finetune_sentiment -- peft=lora\n"
               "  sbatch sst2.sbatch train.lr=1e-4      # key=value after the script go to the recipe too\n\n"
               f"RECIPE: a packaged recipe ({', '.join(recipe_names())}; also written recipes/NAME.py), run on the "
               "nodes as `torchrun -m zerokit train NAME` (an installed zerokit is enough), or the path of your own "
               "script.",
    )
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument("--gpus", type=int, metavar="N",
                   help="GPUs per node = ranks per node; 0 for CPU nodes (one rank per node, gloo)")
    p.add_argument("--gpus-per-node", type=int, dest="gpus", help=argparse.SUPPRESS)  # the old spelling
    p.add_argument("--time", required=True, help="time limit, HH:MM:SS or D-HH:MM:SS")
    p.add_argument("--account", help="SLURM account (Compute Canada: def-yourpi)")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--cpus-per-task", type=int, help="CPUs per node's task (default: 4 per rank)")
    p.add_argument("--mem", help="memory per node, e.g. 64G (default: the cluster's)")
    p.add_argument("--signal-before", type=int, metavar="SECONDS",
                   help=f"send USR1 (checkpoint, stop, requeue) this long before the time limit "
                        f"(default {SIGNAL_BEFORE_S}, or half the limit if that is shorter)")
    p.add_argument("-o", "--output", metavar="FILE", help="write the script here instead of stdout")
    p.add_argument("--submit", action="store_true", help="also submit it with sbatch")
    p.add_argument("recipe", metavar="RECIPE", help="NAME, recipes/NAME.py, or a path to your own script")
    p.add_argument("recipe_args", nargs="*", metavar="key=value", help="recipe settings, after --")
    return p


def recipe_of(text: str) -> str:
    """NAME or recipes/NAME.py of a packaged recipe -> NAME; anything else is the path of a script, as given."""
    path = Path(text)
    if text in recipe_names() or (path.parent == Path("recipes") and path.suffix == ".py"
                                  and path.stem in recipe_names()):
        return path.stem
    if not path.is_file() and ("/" not in text or path.parent == Path("recipes")):  # a typo of a packaged name
        raise UsageError(f"recipe {text} not found here ({Path.cwd()}) and not a packaged recipe; name one of "
                         f"{', '.join(recipe_names())} (also as recipes/NAME.py, e.g. recipes/pretrain_gpt.py), "
                         "or the path of your own script")
    return text


def spec_from_args(ns: argparse.Namespace) -> JobSpec:
    if ns.gpus is None:
        raise UsageError("--gpus N is required: the GPUs per node (0 for CPU nodes), e.g. --gpus 4")
    return JobSpec(recipe=recipe_of(ns.recipe), nodes=ns.nodes, gpus_per_node=ns.gpus, time=ns.time,
                   account=ns.account, partition=ns.partition, cpus_per_task=ns.cpus_per_task, mem=ns.mem,
                   signal_before=ns.signal_before, recipe_args=list(ns.recipe_args))


def slurm_main(argv: list[str]) -> int:
    """`zerokit slurm ...`: print or write the batch script; with --submit, sbatch it. Returns the exit status."""
    ns = parser().parse_args(argv)
    try:
        spec = spec_from_args(ns)
        script = render(spec)
        if not spec.packaged and not Path(spec.recipe).is_file():  # perhaps a path on the cluster
            if ns.submit:
                raise UsageError(f"{spec.recipe} not found here ({Path.cwd()}): submit from the folder it is "
                                 "relative to")
            print(f"zerokit slurm: note: {spec.recipe} does not exist here ({Path.cwd()}); submit the script from a "
                  "folder that has it", file=sys.stderr)
        if ns.output:
            Path(ns.output).write_text(script)
        elif not ns.submit:
            sys.stdout.write(script)
        if ns.submit:
            try:
                cmd = ["sbatch", ns.output] if ns.output else ["sbatch"]  # plain sbatch reads the script on stdin
                done = subprocess.run(cmd, input=None if ns.output else script, text=True)
            except FileNotFoundError:
                raise UsageError("sbatch not found: run --submit on a SLURM login node "
                                 "(or write the script with -o and submit it there)") from None
            return done.returncode
    except UsageError as e:
        print(f"zerokit slurm: error: {e}", file=sys.stderr)
        return 2
    return 0


def committed_scripts() -> dict[str, str]:
    """File name -> content of every script committed in launch/slurm/."""
    return {name: render(spec_from_args(parser().parse_args(argv)), f"launch/slurm/{name}")
            for name, argv in COMMITTED.items()}


def regenerate(directory: Path) -> None:
    for name, text in committed_scripts().items():
        (directory / name).write_text(text)
        print(f"wrote {directory / name}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--regenerate"] and len(sys.argv) <= 3:  # default: launch/slurm of the checkout you are in
        regenerate(Path(sys.argv[2] if len(sys.argv) == 3 else "launch/slurm"))
        sys.exit(0)
    sys.exit(slurm_main(sys.argv[1:]))
