"""CoCa: image encoder + attentional poolers, unimodal text decoder with CLS, multimodal decoder, heads.

The forward runs as named stages (embed_image, image_blocks, pool_image; embed_text, text_blocks,
text_outputs; decode; caption_head), each a submodule, so pipeline partitioning and tensor-parallel swaps can
take them apart without rewriting the model. Nothing here reads global parallel state.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from megacoca.config.model import CoCaConfig
from megacoca.models.coca.decoder import CaptionHead, MultimodalDecoder
from megacoca.models.coca.poolers import ImagePooler
from megacoca.models.coca.text import TextEncoder, kept_text_length
from megacoca.models.coca.vision import VisionEncoder


class CoCa(nn.Module):
    def __init__(self, cfg: CoCaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg)
        self.image_pooler = ImagePooler(cfg)
        self.text = TextEncoder(cfg)
        self.decoder = MultimodalDecoder(cfg)
        self.caption_head = CaptionHead(cfg)
        # Shape [1], not a 0-dim tensor: DeepSpeed's parameter broadcast cannot view a 0-dim tensor as bytes.
        self.logit_scale = nn.Parameter(torch.full((1,), cfg.init_logit_scale))
        self.reset_parameters()
        if cfg.tie_word_embeddings:
            # One Parameter registered in both modules, so ZeRO-3 gathers it in either forward.
            self.caption_head.weight = self.text.embed.token_embedding.weight

    # ---- initialisation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Truncated-normal(0.02) weights, zero biases, output projections scaled by 1/sqrt(2 * depth)."""
        cfg = self.cfg
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for blocks, depth in (
            (self.vision.blocks, cfg.vision_layers),
            (self.text.blocks, cfg.text_layers),
            (self.decoder.layers, cfg.text_layers + cfg.decoder_layers),
        ):
            scale = 1.0 / math.sqrt(2 * depth)
            for name, param in blocks.named_parameters():
                if name.endswith(("out_proj.weight", "fc2.weight")):
                    param.mul_(scale)
        nn.init.normal_(self.vision.embed.positional_embedding, std=0.02)
        if self.vision.embed.class_embedding is not None:
            nn.init.normal_(self.vision.embed.class_embedding, std=0.02)
        nn.init.normal_(self.text.embed.positional_embedding, std=0.01)
        nn.init.normal_(self.text.embed.cls_embedding, std=0.02)
        for pooler in (self.image_pooler.caption_pooler, self.image_pooler.contrastive_pooler):
            if pooler is not None:
                nn.init.normal_(pooler.query, std=0.02)
        nn.init.normal_(self.caption_head.weight, std=0.02)
        self.logit_scale.fill_(cfg.init_logit_scale)

    # ---- towers ---------------------------------------------------------------------------------------------
    def image_towers(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(unnormalised contrastive embedding (B, E), caption image tokens (B, Q, pooled_width))."""
        return self.image_pooler(self.vision(images))

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        embedding, _ = self.image_towers(images)
        return F.normalize(embedding, dim=-1) if normalize else embedding

    def encode_text(self, text: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        keep = None
        if self.cfg.trim_text_padding:
            keep = kept_text_length(text, self.cfg.pad_id, self.cfg.legacy_cls_mask)
        embedding, _ = self.text(text, keep)
        return F.normalize(embedding, dim=-1) if normalize else embedding

    def clamped_logit_scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=self.cfg.max_logit_scale).exp()

    # ---- training forward -----------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, text: torch.Tensor, *, caption_loss: bool = True) -> dict:
        """images (B, 3, H, W); text (B, L): bos, tokens, eos, pads. See docs/design.md for the outputs."""
        cfg = self.cfg
        keep = text.shape[1]
        if caption_loss and cfg.trim_text_padding:
            keep = kept_text_length(text, cfg.pad_id, cfg.legacy_cls_mask)
        image_embedding, image_tokens = self.image_towers(images)
        text_embedding, token_outputs = self.text(text, keep)
        hidden = self.decoder(token_outputs[:, :-1], image_tokens)
        out = {
            "image_features": F.normalize(image_embedding, dim=-1),
            "text_features": F.normalize(text_embedding, dim=-1),
            "logit_scale": self.clamped_logit_scale(),
        }
        targets = text[:, 1:keep]
        if caption_loss:
            out["caption_loss_sum"] = self.caption_head(
                hidden, targets.masked_fill(targets == cfg.pad_id, -100)
            )
            out["caption_tokens"] = (targets != cfg.pad_id).sum()
        else:
            out["logits"] = self.caption_head(hidden)
        return out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
