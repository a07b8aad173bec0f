"""One pipeline stage of a CoCa: the modules it owns, under their single-device names, and its forwards.

A stage is cut out of a (meta or real) CoCa after the tensor-parallel swaps and activation checkpointing, so
it holds the same, already-parallelized modules: `vision.embed` (stage 0), `vision.blocks.<i>` for its ViT
blocks (an nn.ModuleDict keyed by the single-device index, so parameter names stay "vision.blocks.7.attn..."),
and on the last stage `image_pooler`, `text`, `decoder`, `caption_head` and `logit_scale`. Names matching the
single-device model is what lets initialisation (`initial_value`), checkpoints and consolidation treat the
stages' parameters as the parts of one CoCa.

Forwards (each a call of the stage module, so DeepSpeed's engine and ZeRO-3's hooks see them):
- `stage(x)` on a stage before the last: images (stage 0) or the ViT hidden state -> the ViT hidden state;
- `stage(text=..., keep=..., part="text")` on the last stage: the unimodal text tower (text-ahead runs this
  early) -> (text embedding, token outputs);
- `stage(x, text=..., keep=..., text_outputs=...)` on the last stage: its ViT blocks, the poolers, the text
  tower (unless `text_outputs` came from a "text" call), the decoder and the heads -> the training outputs
  that CoCaLoss takes, exactly as CoCa.forward returns them (`contrastive=` / `captioning=` as there);
- `stage(x, part="image")`: the stage's share of the image tower alone (evaluation).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from megacoca.models.coca.model import JoinedTowers
from megacoca.parallel.pipeline.split import StageSplit


class PipelineStage(JoinedTowers, nn.Module):
    def __init__(self, model: nn.Module, split: StageSplit, stage: int) -> None:
        super().__init__()
        if not 0 <= stage < split.pp:
            raise ValueError(f"stage {stage} outside 0..{split.pp - 1}")
        self.cfg = model.cfg
        self.stage, self.pp = stage, split.pp
        self.is_first, self.is_last = stage == 0, stage == split.pp - 1
        self.block_indices = list(split.blocks[stage])
        self._initial_value = model.initial_value  # initialisation by single-device name (see CoCa.initial_value)
        vision = nn.Module()
        if self.is_first:
            vision.embed = model.vision.embed
        vision.blocks = nn.ModuleDict({str(i): model.vision.blocks[i] for i in self.block_indices})
        self.vision = vision
        if self.is_last:
            self.image_pooler = model.image_pooler
            self.text = model.text
            self.decoder = model.decoder
            self.caption_head = model.caption_head  # with tied embeddings, the same Parameter as the text's
            self.logit_scale = model.logit_scale

    def initial_value(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self._initial_value(name, shape)

    def extra_repr(self) -> str:
        return f"stage {self.stage} of {self.pp}, ViT blocks {self.block_indices}"

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.vision.blocks.values():
            x = block(x)
        return x

    def image_part(self, x: torch.Tensor, contrastive: bool = True):
        """This stage's share of the image tower: images (stage 0) or the received ViT hidden state -> the ViT hidden
        state, or on the last stage (unnormalised contrastive embedding or None, caption image tokens)."""
        if self.is_first:
            x = self.vision.embed(x)
        x = self._blocks(x)
        return self.image_pooler(x, contrastive) if self.is_last else x

    def forward(self, x: torch.Tensor | None = None, *, text: torch.Tensor | None = None, keep: int | None = None,
                text_outputs: tuple[torch.Tensor, torch.Tensor] | None = None, part: str = "main",
                contrastive: bool = True, captioning: bool = True):
        if part == "text":
            if not self.is_last:
                raise RuntimeError(f"stage {self.stage} has no text tower (the last stage, {self.pp - 1}, has)")
            return self.text(text, keep)
        if part == "image":
            return self.image_part(x)
        if not self.is_last:
            return self.image_part(x)
        image_embedding, caption_tokens = self.image_part(x, contrastive)
        if text_outputs is None:
            text_outputs = self.text(text, keep)
        text_embedding, token_outputs = text_outputs
        return self.joined_outputs(image_embedding, caption_tokens, text_embedding, token_outputs, text, keep,
                                   contrastive=contrastive, captioning=captioning)

