"""ParallelDims: degree validation and the (dp, pp, tp) rank grid, without a process group."""

import pytest

from megacoca.parallel.dims import ParallelDims


def test_dp_inferred_from_world():
    assert ParallelDims(dp=-1, tp=2, pp=1, world_size=8).dp_size == 4
    assert ParallelDims(dp=-1, tp=1, pp=1, world_size=1).dp_size == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(dp=2, tp=2, pp=1, world_size=8), "dp 2 x pp 1 x tp 2 = 4 != world size 8"),
    (dict(dp=-1, tp=3, pp=1, world_size=8), "world size 8 is not divisible by tp 3 x pp 1 = 3"),
    (dict(dp=0, tp=1, pp=1, world_size=8), "dp must be a positive integer or -1"),
    (dict(dp=-1, tp=0, pp=1, world_size=8), "tp must be a positive integer"),
    (dict(dp=-1, tp=1, pp=-2, world_size=8), "pp must be a positive integer"),
    (dict(dp=-1, tp=1, pp=1, world_size=0), "world_size must be a positive integer"),
    (dict(dp=-1, tp=1, pp=1, world_size=2, rank=2), "rank 2 is outside world size 2"),
])
def test_bad_degrees(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", "\\(").replace(")", "\\)")):
        ParallelDims(**kwargs)


def test_grid_groups_dp2_pp2_tp2():
    dims = ParallelDims(dp=2, pp=2, tp=2, world_size=8)
    groups = dims.group_ranks()
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]  # tensor neighbours are adjacent ranks
    assert groups["pp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups["mp"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for kind in ("tp", "pp", "dp"):  # each kind partitions the world
        assert sorted(r for g in groups[kind] for r in g) == list(range(8))


def test_coords_and_mpu_ranks():
    dims = ParallelDims(dp=2, pp=2, tp=2, world_size=8, rank=6)  # grid[1, 1, 0]
    assert dims.coords == (1, 1, 0)
    assert (dims.dp_rank, dims.pp_rank, dims.tp_rank) == (1, 1, 0)
    mpu = dims.mpu()
    assert mpu.get_data_parallel_rank() == 1 and mpu.get_data_parallel_world_size() == 2
    assert mpu.get_tensor_model_parallel_rank() == 0 and mpu.get_tensor_model_parallel_world_size() == 2
    assert mpu.get_pipeline_model_parallel_rank() == 1 and mpu.get_pipe_parallel_world_size() == 2
    # The tensor rank: DeepSpeed counts replicated parameters in its grad norms where this is 0, then sums over
    # the (pp, tp) model-parallel group, so every stage's replicated parameters count once.
    assert mpu.get_model_parallel_rank() == 0 and mpu.get_model_parallel_world_size() == 4
    assert mpu.get_slice_parallel_world_size() == 2
    assert mpu.get_data_parallel_group_ranks() == [2, 6]


def test_groups_need_build():
    with pytest.raises(RuntimeError, match="call build\\(\\)"):
        ParallelDims(dp=1, tp=1, pp=1, world_size=1).dp_group
