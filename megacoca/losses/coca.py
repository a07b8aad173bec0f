"""CoCa objective: weighted contrastive + captioning losses (paper weights 1.0 and 2.0)."""

from __future__ import annotations

import torch

from megacoca.losses.caption import caption_loss
from megacoca.losses.contrastive import contrastive_loss


class CoCaLoss:
    def __init__(self, contrastive_weight: float = 1.0, caption_weight: float = 2.0) -> None:
        if contrastive_weight < 0 or caption_weight < 0 or contrastive_weight + caption_weight == 0:
            raise ValueError(
                f"loss weights must be >= 0 and not both 0, got contrastive={contrastive_weight}, "
                f"caption={caption_weight}"
            )
        self.contrastive_weight = contrastive_weight
        self.caption_weight = caption_weight

    def __call__(self, out: dict, dp_group=None) -> tuple[torch.Tensor, dict]:
        loss_contrastive = contrastive_loss(
            out["image_features"], out["text_features"], out["logit_scale"], dp_group
        )
        loss_caption = caption_loss(out["caption_loss_sum"], out["caption_tokens"], dp_group)
        loss = self.contrastive_weight * loss_contrastive + self.caption_weight * loss_caption
        parts = {
            "loss_contrastive": loss_contrastive.detach(),
            "loss_caption": loss_caption.detach(),
            "logit_scale": out["logit_scale"].detach().reshape(()),
        }
        return loss, parts
