# Sourced by slurm/*.sbatch: the allocation -> rendezvous, and the requeue-on-preemption loop.
# Variables: MEGACOCA_DIR (the checkout; default: the directory sbatch was called from), MEGACOCA_PYTHON
# (default: python), MASTER_PORT (default: 20000 + job id mod 40000, so two jobs on a node do not collide).
set -euo pipefail
MEGACOCA_DIR=${MEGACOCA_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$MEGACOCA_DIR"
source slurm/env.sh
MEGACOCA_PYTHON=${MEGACOCA_PYTHON:-python}
REQUEUE_EXIT_CODE=75  # megacoca.launch.preemption.REQUEUE_EXIT_CODE
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "megacoca slurm: error: run this with sbatch (no SLURM_JOB_ID)" >&2
  exit 2
fi
mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
export MASTER_ADDR=${MASTER_ADDR:-${HOSTS[0]}}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 40000))}
echo "megacoca slurm: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${#HOSTS[@]} node(s) ${HOSTS[*]}," \
     "rendezvous $MASTER_ADDR:$MASTER_PORT"

# Run "$@" in the background; on SIGUSR1/SIGTERM (SLURM's warning before the time limit, preemption) pass
# SIGUSR1 on to it, wait for it, and requeue the job when training says it stopped to be resumed.
run_with_requeue() {
  "$@" &
  local child=$! status
  trap 'echo "megacoca slurm: signal received, asking training to checkpoint and stop"; kill -USR1 "$child" 2>/dev/null || true' USR1 TERM
  while true; do
    set +e
    wait "$child"
    status=$?
    set -e
    if ! kill -0 "$child" 2>/dev/null; then break; fi  # wait returned for a trapped signal: the child still runs
  done
  trap - USR1 TERM
  if [[ $status -eq $REQUEUE_EXIT_CODE ]]; then
    echo "megacoca slurm: training stopped with a complete checkpoint; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  echo "megacoca slurm: training exited with status $status"
  exit "$status"
}
