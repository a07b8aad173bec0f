"""DeepSpeed's communication backend, as megacoca starts it.

`without_shared_memory_allreduce()` runs before anything creates DeepSpeed's backend (`deepspeed.init_distributed`,
or `deepspeed.initialize` when the process group came from elsewhere). DeepSpeed's TorchBackend otherwise builds
its `deepspeed_shm_comm` op on every start, which serves only `inference_all_reduce` (DeepSpeed inference and
AutoTP layers; megacoca's training never calls it) and costs, on CPU hosts:

- a JIT build check that recompiles the op (~20 s on 2 cores, 75 s under load) whenever the previous process
  that loaded it ran with another environment (PATH alone is enough): the tests' subprocesses alternate;
- for a single-host job, a 69 MB file per rank in /dev/shm that DeepSpeed never removes: 256 of them (17 GB)
  had filled this 24 GB machine's RAM.
"""

from __future__ import annotations

import importlib


def without_shared_memory_allreduce() -> None:
    """Make DeepSpeed's TorchBackend start without its shared-memory all-reduce op (idempotent)."""
    # importlib, not `import deepspeed.comm.torch as m`: the package's `torch` attribute is the torch module
    torch_backend = importlib.import_module("deepspeed.comm.torch")
    torch_backend.build_shm_op = lambda: None
