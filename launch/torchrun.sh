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
# torchrun from the active venv if any, else the checkout's .venv (scripts/setup_venv.sh), else PATH.
here=$(cd "$(dirname "$0")/.." && pwd)
torchrun=torchrun
if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/torchrun" ]; then
  torchrun=$VIRTUAL_ENV/bin/torchrun
elif [ -x "$here/.venv/bin/torchrun" ]; then
  torchrun=$here/.venv/bin/torchrun
fi
# Same hang-to-error setting as the SLURM scripts: a failed NCCL collective aborts instead of blocking.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# --standalone: a local rendezvous on a free port, so two runs on one machine don't collide.
exec "$torchrun" --standalone --nproc_per_node "$nproc" "$@"
