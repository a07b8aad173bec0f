"""Autograd-aware collectives over an explicit process group (never an implicit WORLD).

The one home of the all-reduce and all-gather that autograd sees, for the data-parallel losses and the
tensor-parallel layers alike:
- `all_reduce_forward`: sum over the group forward, identity backward;
- `all_reduce_backward`: identity forward, sum of the gradient over the group backward;
- `all_gather_along`: the ranks' shards concatenated along a dim forward, this rank's slice of the gradient
  backward.
The losses use them through `all_gather_with_grad` and `all_reduce_sum` below; the tensor-parallel layers
through Megatron's names (megacoca.parallel.tensor.mappings: copy_to_tp, reduce_from_tp, gather_from_tp).
Every collective is called as `dist.<op>` at call time, so a wrapper of torch.distributed's functions
(benchmarks/tensor_parallel.py's count) sees each one.
"""

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


class _AllReduceForward(torch.autograd.Function):
    """All-reduce (sum) forward; identity backward (Megatron's reduce_from_tensor_model_parallel_region).

    Identity is the right backward when what follows the sum is replicated: every rank computes the same thing
    from the summed value and backpropagates the same gradient into it, and d loss / d sum is already
    d loss / d (this rank's term). All-reducing it again would count it group-size times.
    """

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _AllReduceBackward(torch.autograd.Function):
    """Identity forward; all-reduce (sum) of the gradient over the group backward (Megatron's
    copy_to_tensor_model_parallel_region): for a tensor every rank uses in its own way, whose gradient is the
    sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _AllGather(torch.autograd.Function):
    """Concatenate the ranks' equal shards along `dim` forward; keep this rank's slice of the gradient backward."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.width = dim, x.shape[dim]
        ctx.rank = dist.get_rank(group)
        shards = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(shards, x.contiguous(), group=group)
        return torch.cat(shards, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(ctx.dim, ctx.rank * ctx.width, ctx.width).contiguous(), None, None


def all_reduce_forward(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over the group; the gradient passes through unchanged. Always one all-reduce, even for one rank."""
    return _AllReduceForward.apply(x, group)


def all_reduce_backward(x: torch.Tensor, group) -> torch.Tensor:
    """x itself; its gradient is summed over the group. Always one all-reduce backward, even for one rank."""
    return _AllReduceBackward.apply(x, group)


def all_gather_along(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """The ranks' x concatenated along `dim` (equal shapes); the gradient keeps this rank's slice, unsummed."""
    return _AllGather.apply(x, dim, group)


def all_gather_with_grad(tensor: torch.Tensor, group) -> torch.Tensor:
    """All-gather along dim 0 with gradients flowing back to every rank's shard: the gradient of the gathered
    tensor is summed over the group (all_reduce works on gloo and NCCL alike, unlike reduce_scatter on gloo),
    then this rank's slice is kept. Identity for one rank."""
    if group_size(group) == 1:
        return tensor
    return all_reduce_backward(all_gather_along(tensor, 0, group), group)


def all_reduce_sum(tensor: torch.Tensor, group) -> torch.Tensor:
    """Sum of a (non-differentiable) tensor over the group; identity for one rank."""
    if group_size(group) == 1:
        return tensor
    return all_reduce_forward(tensor.detach(), group)
