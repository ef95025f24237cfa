#!/usr/bin/env bash
# Train on this machine's GPUs (or CPU processes over gloo): launch/torchrun.sh [--config F] [key=value ...]
# NPROC overrides the process count (default: the GPU count, else 1); DRY_RUN=1 prints the command.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
MASTER_PORT=${MASTER_PORT:-29500} exec bash "$ROOT/launch/node.sh" "$@"
