#!/usr/bin/env bash
# Create or refresh .venv with zerokit and its dependencies. Idempotent: a second
# run with nothing changed returns in about a second (stamp file holds a hash of
# setup.cfg and this script).
#
# Torch: where no NVIDIA GPU is present we install the CPU build torch==2.13.0
# *before* anything else, so no dependency can pull a multi-GB CUDA build. Where
# a GPU is present, an existing CUDA torch (the user's) is kept: create the venv
# with ZEROKIT_SYSTEM_SITE=1 to see it, or install torch into .venv first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${ZEROKIT_EXTRAS:-dev,demo}
stamp="$VENV/.zerokit-setup"
want=$(cat setup.cfg pyproject.toml "$0" | sha256sum | cut -c1-16)-$EXTRAS

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  flags=()
  [ "${ZEROKIT_SYSTEM_SITE:-0}" = 1 ] && flags+=(--system-site-packages)
  "$PY" -m venv "${flags[@]}" "$VENV"
fi
pip() {  # quiet, minus the local package index's "Location ... is ignored" noise
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored" >&2)
}
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found and no torch in $VENV: installing the default (CUDA) torch"
    pip torch
  else
    echo "setup: no NVIDIA GPU: installing the CPU build torch==2.13.0"
    pip torch==2.13.0
  fi
fi
echo "setup: installing zerokit[$EXTRAS] into $VENV (first time ~1-2 min)"
pip -e ".[$EXTRAS]"
echo "$want" > "$stamp"
