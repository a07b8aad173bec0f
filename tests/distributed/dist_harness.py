"""Run a function on N gloo ranks inside pytest: spawned processes, a FileStore rendezvous (no ports).

`run_ranks(fn, world_size, tmp_path, *args)` returns the per-rank results in rank order; an exception on
any rank fails the test with that rank's traceback, and a rank still running after `timeout` is killed
and reported as a hang. `fn(rank, world_size, *args)` must be a module-level function (spawn pickles it).
"""

from __future__ import annotations

import os
import queue as queue_module
import traceback

import torch.multiprocessing as mp


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
        results.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, tmp_path, *args, timeout: float = 240, env: dict | None = None) -> list:
    ctx = mp.get_context("spawn")
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
    return [collected[rank][1] for rank in range(world_size)]
