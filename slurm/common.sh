# Sourced by slurm/*.sbatch: the allocation -> rendezvous, and the requeue-on-preemption loop.
# Variables: MEGACOCA_DIR (the checkout; default: the directory sbatch was called from), MEGACOCA_PYTHON
# (default: python), MEGACOCA_REQUEUE (default 1; 0 in a chain of --dependency=afterany jobs), MASTER_ADDR
# (default: the first node's NodeAddr), MASTER_PORT (default: the first free port on the first node from
# 20000 + job id mod 40000, so two jobs on a node do not collide; MEGACOCA_PORT_TRIES are tried, default 100),
# MEGACOCA_REQUEUE_WAIT_S (default 1: a refused requeue is tried again after 1, 2, 3 and 4 times that).
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
# The first node's address as SLURM reaches it (its NodeAddr; the host name itself on most clusters)
first_node_addr=$(scontrol show node "${HOSTS[0]}" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n1)
export MASTER_ADDR=${MASTER_ADDR:-${first_node_addr:-${HOSTS[0]}}}
port_free() {  # can a listener bind port $1 here (this node's network)?
  "$MEGACOCA_PYTHON" -c 'import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("0.0.0.0", int(sys.argv[1])))
except OSError:
    sys.exit(1)' "$1" 2>/dev/null
}
# The batch script runs on the first node, the rendezvous host: check the port there before starting anything
# (a port in use would otherwise fail rank 0 with a traceback). Another process can still take it before
# training binds it; that ends the job too (srun --kill-on-bad-exit), it never hangs.
if [[ -n ${MASTER_PORT:-} ]]; then
  if [[ ${SLURMD_NODENAME:-} == "${HOSTS[0]}" ]] && ! port_free "$MASTER_PORT"; then
    echo "megacoca slurm: error: MASTER_PORT $MASTER_PORT is in use on ${HOSTS[0]}; choose a free one or unset it" >&2
    exit 2
  fi
else
  MASTER_PORT=$((20000 + SLURM_JOB_ID % 40000))
  if [[ ${SLURMD_NODENAME:-} == "${HOSTS[0]}" ]]; then
    for ((tries = 0; tries < ${MEGACOCA_PORT_TRIES:-100}; tries++)); do
      port_free "$MASTER_PORT" && break
      MASTER_PORT=$((20000 + (MASTER_PORT - 20000 + 1) % 40000))
    done
    if ((tries == ${MEGACOCA_PORT_TRIES:-100})); then
      echo "megacoca slurm: error: no free port on ${HOSTS[0]} among the ${MEGACOCA_PORT_TRIES:-100} from" \
           "$((20000 + SLURM_JOB_ID % 40000)) (set MASTER_PORT)" >&2
      exit 2
    fi
  fi
  export MASTER_PORT
fi
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
    if [[ ${MEGACOCA_REQUEUE:-1} == 0 ]]; then  # a chain of jobs: the next one (--dependency=afterany) continues
      echo "megacoca slurm: training stopped with a complete checkpoint; not requeueing (MEGACOCA_REQUEUE=0)"
      exit 0
    fi
    echo "megacoca slurm: training stopped with a complete checkpoint; requeueing job $SLURM_JOB_ID"
    # slurmctld can refuse a requeue while the job's step is still being cleaned up: try again before giving up
    for attempt in 1 2 3 4 5; do
      scontrol requeue "$SLURM_JOB_ID" && exit 0
      ((attempt == 5)) || sleep $((attempt * ${MEGACOCA_REQUEUE_WAIT_S:-1}))
    done
    echo "megacoca slurm: error: scontrol requeue $SLURM_JOB_ID failed 5 times; the checkpoint is complete:" \
         "submit the same job again (it resumes with --resume auto)" >&2
    exit "$REQUEUE_EXIT_CODE"
  fi
  echo "megacoca slurm: training exited with status $status"
  exit "$status"
}
