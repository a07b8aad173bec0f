"""ParallelDims.build() on 4 gloo ranks: each group reduces over exactly the ranks of the grid."""

import torch
import torch.distributed as dist
from dist_harness import run_ranks

from megacoca.parallel.dims import ParallelDims


def _reduce_in_groups(rank, world_size):
    dims = ParallelDims(dp=2, tp=2, pp=1, world_size=world_size).build()
    result = {}
    for kind, group in (("dp", dims.dp_group), ("tp", dims.tp_group), ("pp", dims.pp_group), ("mp", dims.mp_group)):
        value = torch.tensor([float(rank)])
        dist.all_reduce(value, group=group)
        result[kind] = value.item()
    mpu = dims.mpu()
    result["mpu_dp"] = mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank()
    result["mpu_groups_ok"] = mpu.get_data_parallel_group() is dims.dp_group and \
        mpu.get_tensor_model_parallel_group() is dims.tp_group
    result["src"] = mpu.get_tensor_model_parallel_src_rank()
    return result


def test_groups_follow_the_grid(tmp_path):
    results = run_ranks(_reduce_in_groups, 4, tmp_path)
    # grid (dp=2, pp=1, tp=2): tp groups {0,1} {2,3}; dp groups {0,2} {1,3}; pp groups are single ranks.
    for rank, r in enumerate(results):
        assert r["tp"] == {0: 1, 1: 1, 2: 5, 3: 5}[rank]
        assert r["dp"] == {0: 2, 1: 4, 2: 2, 3: 4}[rank]
        assert r["pp"] == rank
        assert r["mp"] == r["tp"]
        assert r["mpu_dp"] == (2, rank // 2)
        assert r["mpu_groups_ok"]
        assert r["src"] == rank - rank % 2
