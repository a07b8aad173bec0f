"""Run a function on N gloo ranks inside pytest: spawned processes, a FileStore rendezvous (no ports).

`run_ranks(fn, world_size, tmp_path, *args)` returns the per-rank results in rank order; an exception on
any rank fails the test with that rank's traceback, and a rank still running after `timeout` is killed
and reported as a hang. `fn(rank, world_size, *args)` must be a module-level function (it is pickled).

Ranks start from a forkserver that imported torch and DeepSpeed once: a fresh interpreter per rank costs
~10-20 s of imports on a 2-core machine (several importing the CUDA build of torch at once), a fork from the
server well under a second, and the server never ran a thread, so forking it is safe.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_module
import traceback

import multiprocessing as mp

PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "deepspeed", "megacoca.trainer", "megacoca.models.coca",
           "megacoca.losses", "megacoca.checkpoint",
           "deepspeed.runtime.zero.muon.muon_optimizer",  # torch.compile at import: pulls in inductor (~6 s)
           "deepspeed.runtime.zero.stage3", "deepspeed.runtime.zero.stage_1_and_2", "torch.utils.tensorboard"]
_CONTEXT = None


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def _entry(fn, rank, world_size, store_path, results, args, env):
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", store=dist.FileStore(store_path, world_size), rank=rank,
                                world_size=world_size)
        result = fn(rank, world_size, *args)
        # plain pickle: tensors travel inline, not as shared memory that dies with this process
        results.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, tmp_path, *args, timeout: float = 240, env: dict | None = None) -> list:
    ctx = _context()
    results = ctx.Queue()
    store_path = os.path.join(str(tmp_path), f"filestore_{fn.__name__}")
    if os.path.exists(store_path):
        os.remove(store_path)
    procs = [ctx.Process(target=_entry, args=(fn, rank, world_size, store_path, results, args, env or {}))
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    collected: dict[int, tuple[str, object]] = {}
    import time

    deadline = time.monotonic() + timeout
    while len(collected) < world_size and time.monotonic() < deadline:
        try:
            rank, status, value = results.get(timeout=1)
            collected[rank] = (status, value)
            if status == "error":
                break
        except queue_module.Empty:
            if any(p.exitcode not in (None, 0) for p in procs) and not any(p.is_alive() for p in procs):
                break
    for proc in procs:
        proc.join(timeout=5 if len(collected) == world_size else 0.5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    errors = [f"rank {rank}:\n{value}" for rank, (status, value) in sorted(collected.items()) if status == "error"]
    if errors:
        raise AssertionError("\n".join(errors))
    if len(collected) < world_size:
        missing = sorted(set(range(world_size)) - set(collected))
        raise AssertionError(f"ranks {missing} gave no result within {timeout}s (hang or crash; exit codes "
                             f"{[p.exitcode for p in procs]})")
    return [pickle.loads(collected[rank][1]) for rank in range(world_size)]
