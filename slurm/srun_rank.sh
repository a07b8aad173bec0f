#!/usr/bin/env bash
# One task per rank under srun: map SLURM's task variables to what torch.distributed reads, then become the
# command (exec: signals SLURM sends the task reach the trainer itself). No mpi4py needed.
#   srun slurm/srun_rank.sh python -m megacoca.train --recipe ...
set -euo pipefail
export RANK=$SLURM_PROCID
export LOCAL_RANK=$SLURM_LOCALID
export WORLD_SIZE=$SLURM_NTASKS
export LOCAL_WORLD_SIZE=${SLURM_NTASKS_PER_NODE:-$SLURM_NTASKS}
export LOCAL_WORLD_SIZE=${LOCAL_WORLD_SIZE%%(*}  # "2(x3)" -> 2
: "${MASTER_ADDR:?MASTER_ADDR is not set (the batch script derives it from the allocation)}"
: "${MASTER_PORT:?MASTER_PORT is not set (the batch script derives it from the job id)}"
exec "$@"
