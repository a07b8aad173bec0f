"""Run a function on N gloo ranks inside pytest: megacoca.launch.ranks with the suite's preload list.

`run_ranks(fn, world_size, tmp_path, *args)` returns the per-rank results in rank order; an exception on
any rank fails the test (AssertionError) with that rank's traceback, and a rank still running after `timeout` is
killed and reported as a hang, with the exit codes. `fn(rank, world_size, *args)` must be a module-level function
(it is pickled); the FileStore rendezvous lives in `tmp_path`.

Ranks are forked from a forkserver that imported torch and DeepSpeed once (PRELOAD): a fresh interpreter per rank
costs ~10-20 s of imports on a 2-core machine (several importing the CUDA build of torch at once), a fork from the
server well under a second.
"""

from __future__ import annotations

from megacoca.launch.ranks import RankFailure, context
from megacoca.launch.ranks import run_ranks as _run_ranks

PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "deepspeed", "megacoca.trainer", "megacoca.models.coca",
           "megacoca.losses", "megacoca.checkpoint",
           "deepspeed.runtime.zero.muon.muon_optimizer",  # torch.compile at import: pulls in inductor (~6 s)
           "deepspeed.runtime.zero.stage3", "deepspeed.runtime.zero.stage_1_and_2", "torch.utils.tensorboard"]


def _context():
    """The forkserver context the ranks come from (a test that starts its own processes uses it too)."""
    return context(PRELOAD)


def run_ranks(fn, world_size: int, tmp_path, *args, timeout: float = 240, env: dict | None = None) -> list:
    try:
        return _run_ranks(fn, world_size, *args, timeout=timeout, env=env, preload=PRELOAD, store_dir=str(tmp_path))
    except RankFailure as failure:
        raise AssertionError(str(failure)) from None
