"""The vocabulary-parallel cross-entropy in torch (Megatron's tensor_parallel/cross_entropy.py): each rank holds
the logits of its shard of a padded vocabulary, and no rank ever builds the full (tokens x vocab) logits.

Megatron's three reductions over the tensor-parallel group (max, target logit, sum of exponentials) as two
all-reduces per forward: the MAX of the row maxima, then one SUM of the stacked [sum of exponentials, target
logit]. The backward is softmax - onehot on the shard, from the forward's saved softmax, with no collective.

This is the model's torch path (kernels="torch", or "auto" off CUDA). The Triton path is
megacoca_kernels.linear_cross_entropy with a tp_group, which fuses the same computation with the caption
head's matmul; the kernel tests check the two against each other on 2 and 4 ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy from each rank's logits shard (N, Vl) fp32 (the two all-reduces above).
    Backward: softmax - onehot on the shard, times each token's incoming grad. Padding columns arrive as
    -inf; ignored rows have loss 0 and gradient 0."""

    @staticmethod
    def forward(ctx, logits, target, vocab_start, ignore_index, group):
        ignored = target == ignore_index
        local_target = target - vocab_start
        in_shard = (local_target >= 0) & (local_target < logits.shape[-1]) & ~ignored
        row_max = logits.max(dim=-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - row_max[:, None]
        picked = shifted.gather(1, local_target.clamp(0, logits.shape[-1] - 1)[:, None]).squeeze(1)
        picked = picked.masked_fill(~in_shard, 0.0)
        exp = shifted.exp()
        sums = torch.stack([exp.sum(dim=-1), picked])
        dist.all_reduce(sums, group=group)
        loss = (sums[0].log() - sums[1]).masked_fill(ignored, 0.0)
        exp.div_(sums[0][:, None])  # the softmax shard, kept for backward
        ctx.save_for_backward(exp, local_target, in_shard, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad):
        softmax, local_target, in_shard, ignored = ctx.saved_tensors
        # softmax - onehot on the rows whose target is in this shard; no host sync (no nonzero/indexing by mask)
        index = local_target.clamp(0, softmax.shape[-1] - 1)[:, None]
        softmax.scatter_add_(1, index, -in_shard.to(softmax.dtype)[:, None])
        softmax.masked_fill_(ignored[:, None], 0.0)
        return softmax * grad[:, None], None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, vocab_start: int, vocab_valid: int,
                                 ignore_index: int, group) -> torch.Tensor:
    """Per-token cross-entropy (N,) fp32 of the full-vocabulary logits of which this rank holds columns
    [vocab_start, vocab_start + logits.shape[-1]) as logits (N, Vl); columns >= vocab_valid of the shard are
    padding, targets are global ids, ignore_index tokens get 0. The same on every rank of `group`; the
    gradient reaching `logits` is this shard's, so the caller sums the hidden states' gradient over the group
    (`copy_to_tp` before the head's matmul), as for any column-parallel layer."""
    logits = logits.float()
    if vocab_valid < logits.shape[-1]:
        logits = logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) >= vocab_valid,
                                    float("-inf"))
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_start, ignore_index, group)
