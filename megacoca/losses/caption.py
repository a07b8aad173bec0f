"""Captioning cross-entropy normalised by a global token count."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megacoca.parallel.collectives import all_reduce_sum, group_size


def caption_loss(caption_loss_sum: torch.Tensor, caption_tokens: torch.Tensor, dp_group=None) -> torch.Tensor:
    """Local token sum x dp_size / global token count: the dp-mean of this over ranks (what data-parallel
    gradient averaging computes) is the mean token loss of the global batch, however tokens split by rank."""
    return StepTokens.count(caption_tokens, 1, dp_group).loss(caption_loss_sum)


def caption_token_count(text: torch.Tensor, pad_id: int) -> torch.Tensor:
    """The caption targets of a batch of token ids (B, L): every non-pad position after the first, as the model's
    `caption_tokens` counts them (a long scalar on the text's device)."""
    return (text[:, 1:] != pad_id).sum()


@dataclass(frozen=True)
class StepTokens:
    """The caption tokens of a whole step (every micro-batch of every data-parallel rank), counted before its first
    backward, so that each micro-batch's caption loss is its share of the step's mean token loss over the global
    batch: `loss(sum) = sum x micro_batches x dp_size / total`. DeepSpeed divides each micro-batch's loss by
    micro_batches and averages the ranks' gradients, so the step's loss and gradient are those of one process
    computing the whole global batch in one piece, however unevenly the tokens fall on micro-batches. With one
    micro-batch this is exactly (bit for bit) `caption_loss`."""

    share: int  # micro_batches x dp_size
    total: torch.Tensor  # the global count, fp32, at least 1

    @classmethod
    def count(cls, local_tokens: torch.Tensor, micro_batches: int, dp_group=None) -> "StepTokens":
        """`local_tokens`: this rank's count over the step's micro-batches; one all-reduce over `dp_group`."""
        total = all_reduce_sum(local_tokens.to(torch.float32), dp_group).clamp(min=1)
        return cls(micro_batches * group_size(dp_group), total)

    def loss(self, caption_loss_sum: torch.Tensor) -> torch.Tensor:
        return caption_loss_sum.float() * self.share / self.total
