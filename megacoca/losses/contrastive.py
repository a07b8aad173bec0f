"""Symmetric contrastive (InfoNCE) loss over the global data-parallel batch, local-loss formulation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megacoca.parallel.collectives import all_gather_with_grad, group_rank


def contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, dp_group=None
) -> torch.Tensor:
    """Each rank scores its B local rows against all gathered features (labels offset by its dp rank).

    The features are gathered WITH gradient over the data-parallel group only, so the dp-mean of the
    per-rank losses is the global-batch loss and the dp-averaged gradients equal one process's over the
    whole batch. Features must be L2-normalised; computed in fp32.
    """
    image_features = image_features.float()
    text_features = text_features.float()
    return gathered_contrastive_loss(image_features, text_features, all_gather_with_grad(image_features, dp_group),
                                     all_gather_with_grad(text_features, dp_group), logit_scale, group_rank(dp_group))


def gathered_contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, all_image: torch.Tensor,
                              all_text: torch.Tensor, logit_scale: torch.Tensor, rank: int) -> torch.Tensor:
    """The local rows (fp32) of data-parallel rank `rank` against every row of the gathered `all_image` /
    `all_text`, where the local rows sit at [rank x rows, (rank + 1) x rows)."""
    scale = logit_scale.float().reshape(())
    logits_per_image = scale * image_features @ all_text.T
    logits_per_text = scale * text_features @ all_image.T
    rows = image_features.shape[0]
    labels = torch.arange(rows, device=image_features.device) + rows * rank
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
