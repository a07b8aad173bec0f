"""The tensor-parallel region mappings (Megatron's tensor_parallel/mappings.py): the three autograd collectives
every tensor-parallel layer is written with, over the tensor-parallel group it is given.

- `copy_to_tp`: identity forward, all-reduce (sum) of the gradient backward: the input of a column-parallel
  layer, the same on every rank, whose gradient is the sum of the ranks' partial gradients.
- `reduce_from_tp`: all-reduce (sum) forward, identity backward: the partial outputs of a row-parallel layer
  (and of the vocabulary-parallel embedding).
- `gather_from_tp`: the ranks' shards concatenated along the last dim forward, this rank's slice of the
  gradient backward: the full logits of the vocabulary-parallel caption head (generation and eval only).

Each is one collective, issued even on a one-rank group (the planner's analytic count, plan/comm.py, and
benchmarks/tensor_parallel.py count them per layer). They are megacoca.parallel.collectives' autograd
collectives, the ones the data-parallel losses use too, under the names of their role here.
"""

from __future__ import annotations

import torch

from megacoca.parallel.collectives import all_gather_along, all_reduce_backward, all_reduce_forward


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return all_reduce_backward(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return all_reduce_forward(x, group)


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return all_gather_along(x, -1, group)
