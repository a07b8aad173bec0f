"""The process group of a training run: the launcher's rank variables, the default group, and the way out.

`megacoca train` runs the same way under `deepspeed` (--num_gpus / --hostfile), `torchrun`, srun wrappers, or as
a plain single process, which then makes a one-rank group itself (`ensure_launch_env`).
"""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta

from megacoca.launch.deepspeed_comm import without_shared_memory_allreduce

_made = False  # this process has had a default process group (exit_process then skips the interpreter teardown)


def free_port() -> int:
    """A port on 127.0.0.1 nobody listens on now (for a one-host rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_launch_env() -> None:
    """A plain `python -m megacoca.train` is a one-rank job: give it the env a launcher would."""
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")


def init_distributed(timeout_s: float | None = None) -> None:
    """The default process group; `timeout_s` (fault.collective_timeout_s) bounds the rendezvous and every
    collective of it, so a rank that stops cannot hold the others forever (megacoca.launch.watchdog)."""
    # heavy (torch, DeepSpeed's accelerator probe): `megacoca --help` imports this module for exit_process
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    global _made
    if dist.is_initialized():
        return
    accelerator = get_accelerator()
    if accelerator.device_name() == "cuda":
        accelerator.set_device(int(os.environ["LOCAL_RANK"]))
    kwargs = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    without_shared_memory_allreduce()
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), auto_mpi_discovery=False,
                               **kwargs)
    _made = True


def exit_process(code: int) -> None:
    """End the process with `code`. Once this process has had a process group, without the interpreter's
    teardown: gloo's worker threads can then still hold work (ZeRO-3's prefetches) whose tensors, freed during
    finalization, abort the process ("terminate called without an active exception", SIGABRT). That turned a
    finished run's status into 134 and a preempted run's 75 (requeue) into a failure, now and then on a loaded
    machine. Everything megacoca writes is closed by then (Trainer.close, the process group destroyed)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if _made:
        os._exit(code)
    sys.exit(code)
