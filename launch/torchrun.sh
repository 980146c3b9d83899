#!/usr/bin/env bash
# One node, NPROC processes:
#   launch/torchrun.sh NPROC recipes/pretrain_gpt.py key=value ...
#   launch/torchrun.sh 2 recipes/pretrain_gpt.py model.preset=gpt-tiny train.max_steps=50   # 2 CPU ranks (gloo)
# For several nodes use the SLURM scripts in launch/slurm/ (zerokit slurm --help).
set -euo pipefail
if [ $# -lt 2 ] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: launch/torchrun.sh NPROC RECIPE [key=value ...]   (NPROC: processes on this node, e.g. its GPU count)" >&2
  exit 2
fi
nproc=$1
shift
# The checkout's venv if there is one, else whatever torchrun is on PATH (an activated venv).
here=$(cd "$(dirname "$0")/.." && pwd)
torchrun=torchrun
[ -x "$here/.venv/bin/torchrun" ] && torchrun=$here/.venv/bin/torchrun
# Same hang-to-error setting as the SLURM scripts: a failed NCCL collective aborts instead of blocking.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# --standalone: a local rendezvous on a free port, so two runs on one machine don't collide.
exec "$torchrun" --standalone --nproc_per_node "$nproc" "$@"
