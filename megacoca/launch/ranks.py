"""Run a function on N ranks of this machine: forked from a forkserver, FileStore rendezvous (no ports).

The one rank runner of the planner's measurements (megacoca.profiling), the test suite
(tests/distributed/dist_harness.py) and the benchmarks. `run_ranks(fn, world_size, *args)` returns
`fn(rank, world_size, *args)` of every rank, in rank order, each with a gloo process group and one CPU thread;
with `init=False`, `fn(rank, world_size, store_path, *args)` sets up its own process group (another backend, a
device) from the FileStore at `store_path`. Every rank gets the launcher's variables (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, a dummy MASTER_PORT: DeepSpeed reads them) and `env`.

Failures raise `RankFailure` (a RuntimeError) prefixed with `what`: an exception on any rank, with that rank's
traceback (the first one reported; the others are then killed); ranks that died without a word (killed, or a
crash below Python), with the exit codes; ranks still running after `timeout` seconds, which are killed. Once a
rank has died without a result the runner waits for the others while any lives (their errors usually say more:
"Connection closed by peer"), or `grace` seconds when given. `fn` must be a module-level function (it is
pickled), and a script that calls this needs the `if __name__ == "__main__":` guard (the forkserver imports the
main module). Results travel as plain pickles: tensors inline, not as shared memory that dies with the rank.

The forkserver imports `preload` once (torch, DeepSpeed, the model code: a caller names what its ranks use), and
each rank is a fork of it: well under a second, where a fresh interpreter spends 10-20 s importing on a small
machine, and the server never ran a thread, so forking it is safe. There is one forkserver per process: the
first call's `preload` is the one imported.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_module
import tempfile
import time
import traceback

PRELOAD = ["torch", "torch.distributed"]  # the least a rank needs; callers name their own modules on top
_CONTEXT = None


class RankFailure(RuntimeError):
    """A rank raised (its traceback is in the message), died without a result, or outlived the timeout."""


def context(preload: list[str] | None = None):
    """The forkserver context; `preload` (default PRELOAD) is imported there if the server is not running yet."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
    _CONTEXT.set_forkserver_preload(PRELOAD if preload is None else preload)
    return _CONTEXT


def _entry(fn, rank: int, world_size: int, store_path: str, results, args, env: dict, init: bool) -> None:
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    # heavy, and only a rank needs them (the forkserver imported them once): the parent never imports torch here
    import torch
    import torch.distributed as dist

    try:
        if init:
            torch.set_num_threads(1)  # N ranks share the machine's cores
            dist.init_process_group("gloo", store=dist.FileStore(store_path, world_size), rank=rank,
                                    world_size=world_size)
            result = fn(rank, world_size, *args)
        else:
            result = fn(rank, world_size, store_path, *args)
        results.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _collect(results, procs: list, timeout: float, grace: float | None) -> dict[int, tuple[str, object]]:
    """{rank: (status, value)} as the ranks report, until all have, one reports an error, the deadline passes, or
    a rank has died without a word and the others are gone too (or `grace` seconds have passed since)."""
    collected: dict[int, tuple[str, object]] = {}
    deadline = time.monotonic() + timeout
    silent_since = None
    while len(collected) < len(procs) and time.monotonic() < deadline:
        try:
            rank, status, value = results.get(timeout=1)
        except queue_module.Empty:
            if not any(p.exitcode is not None and rank not in collected for rank, p in enumerate(procs)):
                continue
            silent_since = silent_since or time.monotonic()
            waited_enough = grace is not None and time.monotonic() - silent_since >= grace
            if (waited_enough or not any(p.is_alive() for p in procs)) and results.empty():
                break  # a rank died without a word: the survivors would wait for it until the rendezvous timeout
            continue
        collected[rank] = (status, value)
        if status == "error":
            break
    return collected


def run_ranks(fn, world_size: int, *args, timeout: float = 600, env: dict | None = None, init: bool = True,
              preload: list[str] | None = None, what: str = "", store_dir: str | None = None,
              grace: float | None = None) -> list:
    """`fn` on `world_size` forked ranks; their results in rank order (see the module docstring). `store_dir`: where
    the FileStore file lives (`filestore_<fn name>`, replaced; default a temporary directory, removed after)."""
    ctx = context(preload)
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="megacoca_ranks_") as scratch:
        store_path = os.path.join(store_dir or scratch, f"filestore_{fn.__name__}")
        if os.path.exists(store_path):
            os.remove(store_path)
        procs = [ctx.Process(target=_entry, args=(fn, rank, world_size, store_path, results, args, env or {}, init))
                 for rank in range(world_size)]
        for proc in procs:
            proc.start()
        collected = _collect(results, procs, timeout, grace)
        for proc in procs:
            proc.join(timeout=5 if len(collected) == world_size else 0.5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    errors = [f"rank {rank}:\n{value}" for rank, (status, value) in sorted(collected.items()) if status == "error"]
    if errors:
        raise RankFailure(what + "\n".join(errors))
    if len(collected) < world_size:
        missing = sorted(set(range(world_size)) - set(collected))
        raise RankFailure(f"{what}ranks {missing} gave no result: a crash, or a hang past {timeout:g} s (exit codes "
                          f"{[p.exitcode for p in procs]})")
    return [pickle.loads(collected[rank][1]) for rank in range(world_size)]
