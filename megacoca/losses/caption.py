"""Captioning cross-entropy normalised by the global token count."""

from __future__ import annotations

import torch

from megacoca.parallel.collectives import all_reduce_sum, group_size


def caption_loss(caption_loss_sum: torch.Tensor, caption_tokens: torch.Tensor, dp_group=None) -> torch.Tensor:
    """Local token sum x dp_size / global token count: the dp-mean of this over ranks (what data-parallel
    gradient averaging computes) is the mean token loss of the global batch, however tokens split by rank."""
    global_tokens = all_reduce_sum(caption_tokens.to(torch.float32), dp_group).clamp(min=1)
    return caption_loss_sum.float() * group_size(dp_group) / global_tokens
