"""The tensor-parallel layers (Megatron's tensor_parallel/layers.py, written for CoCa), each built from the
single-device layer it replaces (`from_dense`) and holding its rank's shard of that layer's parameters.

- ColumnParallelLinear splits the output features: rank r holds rows [r*out/tp, (r+1)*out/tp) of the weight
  and the bias; its input is the same on every rank and passes through `copy_to_tp`.
- RowParallelLinear splits the input features: rank r multiplies its slice of the input by its columns of the
  weight; the partial outputs are summed by `reduce_from_tp` and the replicated bias is added after the sum.
- TensorParallelAttention: q, k, v column-parallel and out row-parallel, so each rank runs heads/tp whole heads
  (the attention code reads its head count from the weights). One `copy_to_tp` per distinct input (the query
  input, and the context of a cross-attention), not one per projection.
- VocabParallelEmbedding and VocabParallelCaptionHead hold rows [r*Vp/tp, (r+1)*Vp/tp) of a vocabulary padded
  to Vp, a multiple of tp (Megatron's make-vocab-size-divisible-by). The embedding looks up the ids in its
  range and sums over ranks; the caption head computes its shard's logits and the vocabulary-parallel cross
  entropy (the Triton fused kernel, or the torch one of cross_entropy.py), so no rank builds the full logits.

Every sharded parameter carries `tensor_model_parallel = True`, `partition_dim`, `partition_stride = 1` (what
DeepSpeed reads through the mpu: its grad norm counts such parameters on every tensor-parallel rank and the
others once) and `tp_shard`, a TensorShard: how to cut it out of, and put it back into, the single-device
tensor. A new layer issues its collectives through mappings.py only (the planner counts them per layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from megacoca.models.coca import ops
from megacoca.models.coca.layers import Attention
from megacoca.parallel.tensor.cross_entropy import vocab_parallel_cross_entropy
from megacoca.parallel.tensor.mappings import copy_to_tp, gather_from_tp, reduce_from_tp


# ----------------------------------------------------------------------------------------------- sharding
@dataclass(frozen=True)
class TensorShard:
    """Where a tensor-parallel parameter sits in the single-device tensor of shape `full_shape`.

    Rank `rank` of `size` holds the slice [rank * local, (rank + 1) * local) along `dim`, local =
    padded / size; `padded` >= full_shape[dim] (the vocabulary padding: positions past full_shape[dim] are
    zeros that belong to no single-device tensor).
    """

    dim: int
    full_shape: tuple[int, ...]
    rank: int
    size: int
    padded: int

    @property
    def local(self) -> int:
        return self.padded // self.size

    @property
    def start(self) -> int:
        return self.rank * self.local

    @property
    def valid(self) -> int:
        """How many of this shard's positions along `dim` are real (not padding)."""
        return max(0, min(self.local, self.full_shape[self.dim] - self.start))

    @property
    def local_shape(self) -> tuple[int, ...]:
        shape = list(self.full_shape)
        shape[self.dim] = self.local
        return tuple(shape)

    def cut(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of the single-device tensor (padding positions zero)."""
        out = full.new_zeros(self.local_shape)
        if self.valid:
            out.narrow(self.dim, 0, self.valid).copy_(full.narrow(self.dim, self.start, self.valid))
        return out


def padded_size(size: int, tp: int) -> int:
    return -(-size // tp) * tp


def _shard_parameter(dense: torch.Tensor, shard: TensorShard) -> nn.Parameter:
    """A new Parameter holding `shard` of `dense` (meta stays meta), marked for DeepSpeed and conversion."""
    if dense.is_meta:
        param = nn.Parameter(torch.empty(shard.local_shape, device="meta", dtype=dense.dtype))
    else:
        param = nn.Parameter(shard.cut(dense.detach()))
    param.requires_grad_(dense.requires_grad)
    param.tensor_model_parallel = True
    param.partition_dim = shard.dim
    param.partition_stride = 1
    param.tp_shard = shard
    return param


# ------------------------------------------------------------------------------------------------ layers
class ColumnParallelLinear(nn.Module):
    """y_r = x W_r^T + b_r: the output features split across the group. `copy_input=False` when the caller
    already applied `copy_to_tp` to x (one copy shared by several column-parallel layers on the same input)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, group, copy_input: bool = True):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.group, self.copy_input = group, copy_input

    @classmethod
    def from_dense(cls, linear: nn.Linear, group, rank: int, size: int, copy_input: bool = True):
        out_features = linear.weight.shape[0]
        shard = lambda t: TensorShard(0, tuple(t.shape), rank, size, out_features)  # noqa: E731
        weight = _shard_parameter(linear.weight, shard(linear.weight))
        bias = _shard_parameter(linear.bias, shard(linear.bias)) if linear.bias is not None else None
        return cls(weight, bias, group, copy_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.copy_input:
            x = copy_to_tp(x, self.group)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum_r x_r W_r^T + b: the input features split across the group, the bias replicated and added once
    after the all-reduce."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, group):
        super().__init__()
        self.weight, self.bias, self.group = weight, bias, group

    @classmethod
    def from_dense(cls, linear: nn.Linear, group, rank: int, size: int):
        weight = _shard_parameter(linear.weight, TensorShard(1, tuple(linear.weight.shape), rank, size,
                                                             linear.weight.shape[1]))
        return cls(weight, linear.bias, group)  # the bias stays the same replicated Parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = reduce_from_tp(F.linear(x, self.weight), self.group)
        return out + self.bias if self.bias is not None else out


class TensorParallelAttention(Attention):
    """Attention over heads/tp heads per rank: q, k, v column-parallel, out row-parallel; the inputs are copied
    into the tensor-parallel region once each (the query input, and a cross-attention's context)."""

    @classmethod
    def from_dense(cls, attention: Attention, group, rank: int, size: int):
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.head_dim, module.kernels, module.group = attention.head_dim, attention.kernels, group
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(module, name, ColumnParallelLinear.from_dense(getattr(attention, name), group, rank, size,
                                                                  copy_input=False))
        module.out_proj = RowParallelLinear.from_dense(attention.out_proj, group, rank, size)
        return module

    def forward(self, x, context=None, **kwargs):
        if x.dim() == 3 and x.shape[0] > 1 and x.stride(0) == 0:
            # An attentional pooler's queries: one (Q, width) tensor expanded over the batch. Copy it before the
            # expand, so the backward all-reduce carries (Q, width) (expand's backward sums over the batch
            # first), not (B, Q, width).
            x = copy_to_tp(x[:1], self.group).expand_as(x)
        else:
            x = copy_to_tp(x, self.group)
        if context is not None:
            context = copy_to_tp(context, self.group)
        return super().forward(x, context, **kwargs)


class VocabParallelEmbedding(nn.Module):
    """Token embedding over rows [start, start + Vp/tp) of the padded vocabulary: ids outside the range look up
    zeros, and the ranks' partial embeddings are summed (`reduce_from_tp`)."""

    def __init__(self, weight: nn.Parameter, group):
        super().__init__()
        self.weight, self.group = weight, group

    @property
    def shard(self) -> TensorShard:
        return self.weight.tp_shard

    @classmethod
    def from_dense(cls, embedding: nn.Embedding, group, rank: int, size: int):
        vocab = embedding.weight.shape[0]
        shard = TensorShard(0, tuple(embedding.weight.shape), rank, size, padded_size(vocab, size))
        return cls(_shard_parameter(embedding.weight, shard), group)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        shard = self.shard
        outside = (ids < shard.start) | (ids >= shard.start + shard.local)
        local = (ids - shard.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside[..., None], 0.0)
        return reduce_from_tp(out, self.group)


class VocabParallelCaptionHead(nn.Module):
    """The caption head over this rank's vocabulary shard (tied to the VocabParallelEmbedding's shard when the
    flavor ties them). With targets: the summed token cross-entropy, from the Triton fused kernel (no logits
    at all) or the torch vocabulary-parallel cross entropy; without: the full logits (B, T, V), gathered."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, group, kernels: str):
        super().__init__()
        self.weight, self.bias, self.group, self.kernels = weight, bias, group, kernels

    @classmethod
    def from_dense(cls, head, group, rank: int, size: int, tied_weight: nn.Parameter | None = None):
        vocab = head.weight.shape[0]
        shard = lambda t: TensorShard(0, tuple(t.shape), rank, size, padded_size(vocab, size))  # noqa: E731
        weight = tied_weight if tied_weight is not None else _shard_parameter(head.weight, shard(head.weight))
        bias = _shard_parameter(head.bias, shard(head.bias)) if head.bias is not None else None
        return cls(weight, bias, group, head.kernels)

    @property
    def shard(self) -> TensorShard:
        return self.weight.tp_shard

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None, ignore_index: int = -100):
        shard = self.shard
        hidden = copy_to_tp(hidden, self.group)
        if targets is None:
            logits = gather_from_tp(F.linear(hidden, self.weight, self.bias), self.group)
            return logits[..., : shard.full_shape[0]]
        hidden2d, target1d = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        if ops.use_triton(self.kernels, hidden2d):
            # Optional (triton): imported only once ops.use_triton has found it, as models/coca/ops.py does.
            from megacoca_kernels import linear_cross_entropy

            return linear_cross_entropy(hidden2d, self.weight, target1d, bias=self.bias, ignore_index=ignore_index,
                                        reduction="sum", vocab_start=shard.start, vocab_valid=shard.valid,
                                        tp_group=self.group)
        return vocab_parallel_cross_entropy(F.linear(hidden2d, self.weight, self.bias), target1d,
                                            vocab_start=shard.start, vocab_valid=shard.valid,
                                            ignore_index=ignore_index, group=self.group).sum()

