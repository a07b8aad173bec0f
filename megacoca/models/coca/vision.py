"""ViT image encoder: conv patch embedding, positional embedding, pre-LN blocks."""

from __future__ import annotations

import torch
import torch.nn as nn

from megacoca.config.model import CoCaConfig
from megacoca.models.coca.layers import LayerNorm, SelfAttentionBlock


class VisionEmbedding(nn.Module):
    """Stage `embed_image`: images (B, C, H, W) -> tokens (B, N, width)."""

    def __init__(self, cfg: CoCaConfig) -> None:
        super().__init__()
        width = cfg.vision_width
        self.patch_embed = nn.Conv2d(
            cfg.in_channels, width, cfg.patch_size, stride=cfg.patch_size, bias=cfg.vision_patch_bias
        )
        self.class_embedding = nn.Parameter(torch.zeros(width)) if cfg.vision_class_token else None
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.image_tokens, width))
        self.ln_pre = LayerNorm(width, cfg.ln_eps, cfg.kernels) if cfg.vision_ln_pre else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images.to(self.patch_embed.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        if self.class_embedding is not None:
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x) if self.ln_pre is not None else x


class VisionEncoder(nn.Module):
    """Stages `embed_image` and `image_blocks`."""

    def __init__(self, cfg: CoCaConfig) -> None:
        super().__init__()
        self.embed = VisionEmbedding(cfg)
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(cfg.vision_width, cfg.vision_heads, cfg.vision_mlp_dim, cfg.ln_eps, cfg.kernels)
            for _ in range(cfg.vision_layers)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        return x
