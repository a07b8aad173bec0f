"""megacoca.parallel.replicas without a process group: the checksum and the tp=1 shortcut (the tensor-group check
itself is tests/distributed/test_replicas.py)."""

import torch

from megacoca.parallel.dims import ParallelDims
from megacoca.parallel.replicas import _checksum, check_replicas

CPU = torch.device("cpu")


def test_tp1_returns_none_without_a_collective():
    model = torch.nn.LayerNorm(4)
    optimizer = torch.optim.AdamW(model.parameters())
    assert check_replicas(model, optimizer, ParallelDims(dp=1, tp=1, pp=1, world_size=1)) is None  # no group exists


def test_checksum_sees_one_ulp_and_compensating_changes():
    for dtype in (torch.bfloat16, torch.float32):
        x = (torch.rand(257, generator=torch.Generator().manual_seed(0)) + 0.5).to(dtype)
        base = _checksum(x, CPU)
        assert int(base[0]) == 257 * x.element_size()
        bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
        up = x.view(bits).clone()
        up[3] += 1  # one ulp
        assert _checksum(up.view(dtype), CPU)[1] != base[1], dtype
        # +1 ulp and -1 ulp of two elements (no carry): the word sum is equal, the sum of squares is not
        pair = x.view(bits).clone()
        pair[10] += 1
        pair[20] -= 1
        moved = _checksum(pair.view(dtype), CPU)
        assert moved[1] == base[1] and moved[2] != base[2], dtype


def test_checksum_is_exact_whatever_the_layout():
    x = torch.randn(64, 33)
    assert torch.equal(_checksum(x, CPU)[:3], _checksum(x.t().contiguous().t(), CPU)[:3])  # a strided view
    assert torch.equal(_checksum(x, CPU)[:3], _checksum(x.flip(0).flip(0), CPU)[:3])
    assert torch.equal(_checksum(None, CPU), torch.zeros(4, dtype=torch.int64))
