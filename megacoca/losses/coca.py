"""CoCa objective: weighted contrastive + captioning losses (paper weights 1.0 and 2.0).

A weight of 0 drops that objective (the paper's contrastive-only and captioning-only ablations, Table 8b): the
model is asked not to compute it at all (`model_kwargs`: no multimodal decoder and caption head without
captioning, no contrastive pooler and projection without contrastive), so the ablation also costs what it
would cost on its own. Its part is then 0 here, and the trainer logs it as null.
"""

from __future__ import annotations

import torch

from megacoca.losses.caption import StepTokens, caption_loss
from megacoca.losses.contrastive import contrastive_loss


class CoCaLoss:
    # What a training step logs of the loss, in this order: `sums` adds them up per micro-batch, `logged` turns
    # their step means into the record's values.
    LOGGED = ("loss", "loss_contrastive", "loss_caption", "logit_scale")

    def __init__(self, contrastive_weight: float = 1.0, caption_weight: float = 2.0) -> None:
        if contrastive_weight < 0 or caption_weight < 0 or contrastive_weight + caption_weight == 0:
            raise ValueError(
                f"loss weights must be >= 0 and not both 0, got contrastive={contrastive_weight}, "
                f"caption={caption_weight}"
            )
        self.contrastive_weight = contrastive_weight
        self.caption_weight = caption_weight
        self.contrastive = contrastive_weight > 0
        self.captioning = caption_weight > 0

    @property
    def model_kwargs(self) -> dict:
        """What the model's training forward (CoCa.forward, a pipeline's last stage) must compute for this loss."""
        return {"contrastive": self.contrastive, "captioning": self.captioning}

    def __call__(self, out: dict, dp_group=None, *, step_tokens: StepTokens | None = None,
                 contrastive: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """The weighted loss of a micro-batch's training outputs, and its parts (detached). `step_tokens`: the
        caption loss is this micro-batch's share of the step's mean token loss over the global batch; without it,
        the mean over this micro-batch's tokens (gathered over dp).
        `contrastive`: the contrastive loss computed elsewhere (the global-negatives schedule's, whose gradient
        reaches this micro-batch's features); without it, this micro-batch's gathered over `dp_group`."""
        logit_scale = out["logit_scale"]
        zero = torch.zeros((), device=logit_scale.device)
        loss_contrastive = loss_caption = zero
        if self.contrastive:
            loss_contrastive = contrastive if contrastive is not None else contrastive_loss(
                out["image_features"], out["text_features"], logit_scale, dp_group)
        if self.captioning:
            if step_tokens is not None:
                loss_caption = step_tokens.loss(out["caption_loss_sum"])
            else:
                loss_caption = caption_loss(out["caption_loss_sum"], out["caption_tokens"], dp_group)
        if self.contrastive and self.captioning:
            loss = self.contrastive_weight * loss_contrastive + self.caption_weight * loss_caption
        else:
            loss = self.contrastive_weight * loss_contrastive if self.contrastive else self.caption_weight * loss_caption
        parts = {
            "loss_contrastive": loss_contrastive.detach(),
            "loss_caption": loss_caption.detach(),
            "logit_scale": logit_scale.detach().reshape(()),
        }
        return loss, parts

    def sums(self, loss: torch.Tensor, parts: dict) -> torch.Tensor:
        """This micro-batch's `LOGGED` values, detached, as one fp32 tensor on the loss's device (no host sync): a
        step adds them up over its micro-batches."""
        return torch.stack([loss.detach().float(), parts["loss_contrastive"].float(), parts["loss_caption"].float(),
                            parts["logit_scale"].float()])

    def logged(self, means: list[float]) -> list[float | None]:
        """The step's means of `LOGGED`, with the part of an objective the job dropped (weight 0) as None."""
        values = list(means)
        if not self.contrastive:
            values[1] = None
        if not self.captioning:
            values[2] = None
        return values
