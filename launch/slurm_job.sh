#!/usr/bin/env bash
# The body shared by the sbatch templates: one `launch/node.sh` per node through srun, the
# rendezvous at the first node, logs per job, and a requeue when SLURM warns of the time limit
# or preemption (--signal=B:USR1@<seconds>): the run checkpoints, exits cleanly, and the requeued
# job resumes from the checkpoint (same SLURM_JOB_ID, so the same RUN_DIR).
#
# Outside SLURM, DRY_RUN=1 prints the resolved commands (hosts from DRY_RUN_HOSTS).
set -euo pipefail

ROOT=${RNTP_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$ROOT"
export PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  read -r -a hosts <<< "${DRY_RUN_HOSTS:-node-a}"
  export SLURM_JOB_ID=${SLURM_JOB_ID:-dryrun} SLURM_JOB_NAME=${SLURM_JOB_NAME:-rntp}
else
  mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
fi
export NNODES=${#hosts[@]}
export MASTER_ADDR=${hosts[0]}
job_digits=${SLURM_JOB_ID//[^0-9]/}
export MASTER_PORT=${MASTER_PORT:-$((20000 + ${job_digits:-0} % 20000))}
export RUN_ID=$SLURM_JOB_ID
export RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
export NPROC=${NPROC:-${SLURM_GPUS_ON_NODE:-}}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "job ${SLURM_JOB_ID}: ${NNODES} node(s), rendezvous ${MASTER_ADDR}:${MASTER_PORT}, run dir ${RUN_DIR}"
  for rank in "${!hosts[@]}"; do
    printf 'srun on %s -> ' "${hosts[$rank]}"
    NODE_RANK=$rank bash "$ROOT/launch/node.sh" "$@"
  done
  exit 0
fi

mkdir -p "$RUN_DIR/logs"
preempted=0
# shellcheck disable=SC2329  # called by the trap below
on_warning() {
  preempted=1
  echo "job ${SLURM_JOB_ID}: time limit or preemption warning, checkpointing" >&2
  kill -USR1 "$srun_pid" 2>/dev/null || true  # srun forwards it to every node's launch/node.sh
}
trap on_warning USR1

# Single quotes on purpose: SLURM_NODEID is expanded on each node, not here.
# shellcheck disable=SC2016
srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
  --output="$RUN_DIR/logs/%j-node%n.log" \
  bash -c 'NODE_RANK=$SLURM_NODEID exec bash launch/node.sh "$@"' node "$@" &
srun_pid=$!
status=0
while true; do
  wait "$srun_pid" && status=0 || status=$?
  if kill -0 "$srun_pid" 2>/dev/null; then continue; fi
  break
done

if [[ "$preempted" == 1 ]]; then
  echo "job ${SLURM_JOB_ID}: requeueing to resume from ${RUN_DIR}" >&2
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
