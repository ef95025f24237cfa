#!/usr/bin/env bash
# The body shared by the sbatch templates: one `launch/node.sh` per node through srun, the
# rendezvous at the first node, logs per job, and a requeue when SLURM warns of the time limit
# or preemption (--signal=B:USR1@<seconds>): the run checkpoints, exits cleanly, and the requeued
# job resumes from the checkpoint (same SLURM_JOB_ID, so the same RUN_DIR).
#
# Server mode: SERVER_NODES=K gives the first K nodes to vLLM servers (`rntp serve`, one per node,
# tensor-parallel over its GPUs, on SERVER_HOST:SERVER_PORT, default 0.0.0.0:8000, so the training
# nodes reach them) and trains on the others with rollout.sampler=server pointed at them; the servers
# stop when training ends. Every server route but /health needs a shared secret: the job makes a new
# one (launch/make_secret.sh) in <run dir>/server-secret, mode 600, on the file system all nodes share,
# hands its path (never the secret) to servers and trainers as rollout.server.secret_file, and deletes
# it when the job ends. SERVER_SECRET_FILE names a file of your own instead (kept).
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
SERVER_NODES=${SERVER_NODES:-0}
SERVER_PORT=${SERVER_PORT:-8000}
SERVER_HOST=${SERVER_HOST:-0.0.0.0}
servers=("${hosts[@]:0:SERVER_NODES}")
trainers=("${hosts[@]:SERVER_NODES}")
if (( ${#trainers[@]} == 0 )); then
  echo "SERVER_NODES=${SERVER_NODES} leaves no node of ${#hosts[@]} for training" >&2
  exit 2
fi
train_args=("$@")
export NNODES=${#trainers[@]}
export MASTER_ADDR=${trainers[0]}
job_digits=${SLURM_JOB_ID//[^0-9]/}
export MASTER_PORT=${MASTER_PORT:-$((20000 + ${job_digits:-0} % 20000))}
export RUN_ID=$SLURM_JOB_ID
export RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
export NPROC=${NPROC:-${SLURM_GPUS_ON_NODE:-}}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
own_secret=0
if [[ -z "${SERVER_SECRET_FILE:-}" ]]; then
  [[ "$RUN_DIR" == /* ]] && SERVER_SECRET_FILE=$RUN_DIR/server-secret || SERVER_SECRET_FILE=$ROOT/$RUN_DIR/server-secret
  own_secret=1
fi
if (( SERVER_NODES > 0 )); then
  urls=$(printf "http://%s:${SERVER_PORT}," "${servers[@]}")
  train_args+=("rollout.server.secret_file=${SERVER_SECRET_FILE}" rollout.sampler=server "rollout.server.urls=[${urls%,}]")
fi

serve_cmd=("$PYTHON" -m rntp serve --port "$SERVER_PORT" "$@" "rollout.server.secret_file=${SERVER_SECRET_FILE}"
           --host "$SERVER_HOST" -- --tensor-parallel-size "${NPROC:-1}")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "job ${SLURM_JOB_ID}: ${NNODES} training node(s), rendezvous ${MASTER_ADDR}:${MASTER_PORT}, run dir ${RUN_DIR}"
  for host in "${servers[@]}"; do
    printf 'srun on %s -> server:' "$host"
    printf ' %q' "${serve_cmd[@]}"
    printf '\n'
  done
  for rank in "${!trainers[@]}"; do
    printf 'srun on %s -> ' "${trainers[$rank]}"
    NODE_RANK=$rank bash "$ROOT/launch/node.sh" "${train_args[@]}"
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

server_pid=
if (( SERVER_NODES > 0 )); then
  if (( own_secret )); then
    bash "$ROOT/launch/make_secret.sh" "$SERVER_SECRET_FILE"  # a new one per job (and per requeue)
    trap 'rm -f "$SERVER_SECRET_FILE"' EXIT
  fi
  srun --nodes="$SERVER_NODES" --nodelist="$(IFS=,; echo "${servers[*]}")" --ntasks-per-node=1 \
    --output="$RUN_DIR/logs/%j-server%n.log" "${serve_cmd[@]}" &
  server_pid=$!
fi
# Single quotes on purpose: SLURM_NODEID is expanded on each node, not here.
# shellcheck disable=SC2016
srun --nodes="$NNODES" --nodelist="$(IFS=,; echo "${trainers[*]}")" --ntasks-per-node=1 --kill-on-bad-exit=1 \
  --output="$RUN_DIR/logs/%j-node%n.log" \
  bash -c 'NODE_RANK=$SLURM_NODEID exec bash launch/node.sh "$@"' node "${train_args[@]}" &
srun_pid=$!
status=0
while true; do
  wait "$srun_pid" && status=0 || status=$?
  if kill -0 "$srun_pid" 2>/dev/null; then continue; fi
  break
done
if [[ -n "$server_pid" ]]; then
  kill "$server_pid" 2>/dev/null || true  # training is over; the servers have nothing left to do
  wait "$server_pid" 2>/dev/null || true
fi

if [[ "$preempted" == 1 ]]; then
  echo "job ${SLURM_JOB_ID}: requeueing to resume from ${RUN_DIR}" >&2
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
