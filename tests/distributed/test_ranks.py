"""megacoca.launch.ranks, the one rank runner of the planner, the tests and the benchmarks: results in rank order,
and every way a rank can fail reported as one RankFailure naming it (an exception with its traceback; a rank that
dies without a word, with the exit codes, or the survivor's own error when it has one; a hang past the timeout)."""

import os
import signal

import pytest
import torch.distributed as dist
from dist_harness import PRELOAD

from megacoca.launch.ranks import RankFailure, run_ranks


def _sum_of_ranks(rank, world_size, offset):
    import torch

    value = torch.tensor([float(rank)])
    dist.all_reduce(value)
    return rank, world_size, int(value.item()) + offset, os.environ["RANK"], os.environ.get("MARK")


def _raises_on_rank1(rank, world_size):
    if rank == 1:
        raise ValueError("rank one refuses")
    return rank


def _killed_rank0(rank, world_size):
    if rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()  # the survivor's collective finds its peer gone
    return rank


def _own_group(rank, world_size, store_path):
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world_size), rank=rank, world_size=world_size)
    return dist.get_world_size()


def _hangs(rank, world_size):
    import time

    time.sleep(60)


def test_results_come_back_in_rank_order_with_the_launcher_variables():
    results = run_ranks(_sum_of_ranks, 3, 10, env={"MARK": "x"}, preload=PRELOAD)
    assert results == [(rank, 3, 13, str(rank), "x") for rank in range(3)]
    assert run_ranks(_own_group, 2, init=False, preload=PRELOAD) == [2, 2]


def test_an_exception_names_its_rank_and_traceback():
    with pytest.raises(RankFailure, match="(?s)^what: rank 1:.*ValueError: rank one refuses"):
        run_ranks(_raises_on_rank1, 2, what="what: ", preload=PRELOAD)


def test_a_killed_rank_is_reported():
    with pytest.raises(RankFailure) as info:
        run_ranks(_killed_rank0, 2, timeout=60, preload=PRELOAD)
    message = str(info.value)
    assert "by peer" in message.splitlines()[-1] or "exit codes [-9" in message, message


def test_a_hang_is_killed_at_the_timeout():
    with pytest.raises(RankFailure, match=r"ranks \[0, 1\] gave no result: a crash, or a hang past 3 s"):
        run_ranks(_hangs, 2, timeout=3, preload=PRELOAD)
