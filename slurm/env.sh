# Sourced by slurm/*.sbatch on every node before training. Each knob matters on real clusters; none is forced:
# set it in your environment (or edit this file) and it is passed on, leave it unset and the default applies.
#
#   NCCL_SOCKET_IFNAME   the interface NCCL bootstraps over (e.g. ib0, eth0, ^docker0,lo); unset: NCCL picks
#   NCCL_IB_HCA          InfiniBand adapters to use (e.g. mlx5_0,mlx5_1); unset: all
#   NCCL_DEBUG           WARN (quiet) or INFO (prints the transport it chose: check IB is used across nodes)
#   OMP_NUM_THREADS      CPU threads per rank; default below: the CPUs SLURM gave the task, or 1
#   MEGACOCA_CACHE_DIR   node-local scratch for caches (Triton kernels, torch extensions); default below
#                        /tmp/megacoca-$USER: never a shared filesystem (many ranks compiling into NFS is slow)
#   GLOO_SOCKET_IFNAME   the interface for gloo (CPU runs, and DeepSpeed's CPU-side collectives)

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export MEGACOCA_CACHE_DIR=${MEGACOCA_CACHE_DIR:-/tmp/megacoca-${USER:-$(id -un)}}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$MEGACOCA_CACHE_DIR/triton}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$MEGACOCA_CACHE_DIR/torch_extensions}
export PYTHONUNBUFFERED=1
mkdir -p "$TRITON_CACHE_DIR" "$TORCH_EXTENSIONS_DIR"
