"""Run a function on N gloo CPU ranks of this machine: forked from a forkserver, FileStore rendezvous (no ports).

`run_ranks(fn, world_size, *args)` returns `fn(rank, world_size, *args)` of every rank, in rank order, each with
a gloo process group and one CPU thread; with `init=False`, `fn(rank, world_size, store_path, *args)` sets up its
own process group (another backend, a device) from the FileStore at `store_path`. An exception on any rank raises
RuntimeError with that rank's traceback (prefixed `what`); a rank that dies without a word, or ranks still running
after `timeout` seconds, are killed and reported. `fn` must be a module-level function (it is pickled), and a script that calls
this needs the `if __name__ == "__main__":` guard (the forkserver imports the main module).

The same approach as the test suite's harness (tests/distributed/dist_harness.py), which package code must not
import: the forkserver imports torch and DeepSpeed once, and each rank is a fork of it (well under a second,
where a fresh interpreter spends 10-20 s importing on a small machine).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_module
import tempfile
import time
import traceback

PRELOAD = ["torch", "torch.distributed", "deepspeed", "megacoca.trainer", "megacoca.models.coca", "megacoca.losses",
           "deepspeed.runtime.zero.stage3", "deepspeed.runtime.zero.stage_1_and_2"]
_CONTEXT = None


def _context(preload: list[str]):
    """The forkserver context; `preload` is imported there if this call starts the server (it is one per process)."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
    _CONTEXT.set_forkserver_preload(preload)
    return _CONTEXT


def _entry(fn, rank: int, world_size: int, store_path: str, results, args, env: dict, init: bool) -> None:
    if not init:
        try:
            results.put((rank, "ok", pickle.dumps(fn(rank, world_size, store_path, *args))))
        except BaseException:  # noqa: BLE001 - reported to the parent
            results.put((rank, "error", traceback.format_exc()))
        return
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # N ranks share the machine's cores
    try:
        dist.init_process_group("gloo", store=dist.FileStore(store_path, world_size), rank=rank,
                                world_size=world_size)
        results.put((rank, "ok", pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 600, env: dict | None = None, init: bool = True,
              preload: list[str] | None = None, what: str = "") -> list:
    ctx = _context(PRELOAD if preload is None else preload)
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="megacoca_ranks_") as store_dir:
        store_path = os.path.join(store_dir, "filestore")
        procs = [ctx.Process(target=_entry, args=(fn, rank, world_size, store_path, results, args, env or {}, init))
                 for rank in range(world_size)]
        for proc in procs:
            proc.start()
        collected: dict[int, tuple[str, object]] = {}
        deadline = time.monotonic() + timeout
        while len(collected) < world_size and time.monotonic() < deadline:
            try:
                rank, status, value = results.get(timeout=1)
            except queue_module.Empty:
                if any(p.exitcode is not None and rank not in collected for rank, p in enumerate(procs)):
                    time.sleep(1)  # a rank died without a word (killed, or a crash below Python): the others
                    if results.empty():  # would wait for it until the rendezvous times out
                        break
                continue
            collected[rank] = (status, value)
            if status == "error":
                break
        for proc in procs:
            proc.join(timeout=5 if len(collected) == world_size else 0.5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    errors = [f"rank {rank}:\n{value}" for rank, (status, value) in sorted(collected.items()) if status == "error"]
    if errors:
        raise RuntimeError(what + "\n".join(errors))
    if len(collected) < world_size:
        missing = sorted(set(range(world_size)) - set(collected))
        raise RuntimeError(f"{what}ranks {missing} gave no result: a crash, or a hang past {timeout:g} s (exit codes "
                           f"{[p.exitcode for p in procs]})")
    return [pickle.loads(collected[rank][1]) for rank in range(world_size)]
