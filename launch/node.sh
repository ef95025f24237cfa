#!/usr/bin/env bash
# One node's share of a run: torchrun with this node's rank, rendezvous at MASTER_ADDR:MASTER_PORT.
# SIGUSR1/SIGTERM are passed to the training processes (not to torchrun, which would kill them):
# they write a checkpoint at the end of the step and exit cleanly. torchrun itself ignores USR1, so a
# USR1 sent to every process (as SLURM signals a step) leaves torchrun alone. torchrun starts each
# trainer in a session of its own, so a signal to this script's process group reaches them only
# through the forwarding below.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host MASTER_PORT=29500 NPROC=8 RUN_DIR=runs/x \
#     launch/node.sh --config configs/gpu/single-node.yaml key=value ...
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail

: "${NNODES:=1}" "${NODE_RANK:=0}" "${MASTER_ADDR:=127.0.0.1}" "${MASTER_PORT:=29500}" "${RUN_ID:=rntp}"
if [[ -z "${NPROC:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NPROC=$(nvidia-smi -L | wc -l)
  else
    NPROC=1
  fi
fi
PYTHON=${PYTHON:-python}
args=("$@")
if [[ -n "${RUN_DIR:-}" ]]; then
  args+=("run_dir=${RUN_DIR}")
  # A requeued job continues from its latest checkpoint.
  if [[ -f "${RUN_DIR}/checkpoints/latest" ]]; then
    args+=("resume=${RUN_DIR}")
  fi
fi
cmd=("$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$NPROC"
     --rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR}:${MASTER_PORT}" --rdzv-id="$RUN_ID"
     -m rntp train "${args[@]}")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf 'node %s:' "$NODE_RANK"
  printf ' %q' "${cmd[@]}"
  printf '\n'
  exit 0
fi

# torchrun ignores USR1: srun sends it to every process of the task, and its default action would
# kill torchrun (then srun's --kill-on-bad-exit kills the trainers mid-checkpoint). An ignored signal
# stays ignored across exec; the trainers install their own handler (rntp/train.py).
(trap '' USR1; exec "${cmd[@]}") &
launcher=$!
# shellcheck disable=SC2329  # called by the traps below
forward() {
  echo "node ${NODE_RANK}: got $1, asking the training processes to checkpoint and stop" >&2
  pkill "-$1" -P "$launcher" || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
status=0
while true; do
  wait "$launcher" && status=0 || status=$?
  # `wait` returns early (status > 128) when a trapped signal arrives; keep waiting for torchrun.
  if kill -0 "$launcher" 2>/dev/null; then continue; fi
  break
done
exit "$status"
