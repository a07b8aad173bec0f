#!/usr/bin/env bash
# One task per node (slurm/train.sbatch): this node's ranks through `deepspeed --no_ssh --node_rank`. A
# SIGUSR1/SIGTERM for the job is passed to this node's training ranks only (the deepspeed launcher between
# would otherwise die of it, or kill the ranks before they checkpoint); the launcher's exit status is returned.
set -euo pipefail
hostfile=$1
shift
deepspeed --hostfile "$hostfile" --no_ssh --node_rank "$SLURM_NODEID" --master_addr "$MASTER_ADDR" \
  --master_port "$MASTER_PORT" --module megacoca.train "$@" &
launcher=$!
ranks_of() {  # the megacoca.train processes below pid $1
  local child
  for child in $(pgrep -P "$1"); do
    if tr '\0' ' ' < "/proc/$child/cmdline" 2>/dev/null | grep -q "megacoca.train"; then echo "$child"; fi
    ranks_of "$child"
  done
}
trap 'for pid in $(ranks_of "$launcher"); do kill -USR1 "$pid" 2>/dev/null || true; done' USR1 TERM
while true; do
  set +e
  wait "$launcher"
  status=$?
  set -e
  if ! kill -0 "$launcher" 2>/dev/null; then exit "$status"; fi
done
