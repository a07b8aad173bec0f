"""Autograd-aware collectives over an explicit process group (never an implicit WORLD)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate equal-sized shards along dim 0; backward sums the gradient over the group and keeps this
    rank's slice (all_reduce works on gloo and NCCL alike, unlike reduce_scatter on gloo)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.rows = tensor.shape[0]
        shards = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(shards, tensor.contiguous(), group=group)
        return torch.cat(shards, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.narrow(0, ctx.rank * ctx.rows, ctx.rows), None


def all_gather_with_grad(tensor: torch.Tensor, group) -> torch.Tensor:
    """All-gather along dim 0 with gradients flowing back to every rank's shard; identity for one rank."""
    if group_size(group) == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor, group)


def all_reduce_sum(tensor: torch.Tensor, group) -> torch.Tensor:
    """Sum of a (non-differentiable) tensor over the group; identity for one rank."""
    if group_size(group) == 1:
        return tensor
    tensor = tensor.detach().clone()
    dist.all_reduce(tensor, group=group)
    return tensor
