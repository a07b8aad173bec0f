"""Multimodal decoder (causal self-attention + cross-attention to the caption image tokens + MLP) and its head."""

from __future__ import annotations

import torch
import torch.nn as nn

from megacoca.config.model import CoCaConfig
from megacoca.models.coca import ops
from megacoca.models.coca.layers import CrossAttentionBlock, LayerNorm, SelfAttentionBlock


class DecoderLayer(nn.Module):
    """paper: self-attention, cross-attention, MLP. open_clip: a self-attention block with its own MLP, then a
    cross-attention block with its own MLP (`decoder_mlp_after_self_attn`)."""

    def __init__(self, cfg: CoCaConfig) -> None:
        super().__init__()
        width, heads = cfg.text_width, cfg.text_heads
        self_mlp = cfg.text_mlp_dim if cfg.decoder_mlp_after_self_attn else None
        self.self_block = SelfAttentionBlock(width, heads, self_mlp, cfg.ln_eps, cfg.kernels)
        self.cross_block = CrossAttentionBlock(
            width, heads, cfg.pooled_width, cfg.text_mlp_dim, cfg.ln_eps, cfg.kernels
        )

    def forward(self, x, image_tokens, self_cache=None, cross_cache=None):
        x = self.self_block(x, causal=True, cache=self_cache)
        return self.cross_block(x, image_tokens, cache=cross_cache)


class MultimodalDecoder(nn.Module):
    """Stage `decode`: unimodal token outputs (B, T, width) + caption image tokens -> hidden (B, T, width)."""

    def __init__(self, cfg: CoCaConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.ln_final = LayerNorm(cfg.text_width, cfg.ln_eps, cfg.kernels)

    def forward(self, x: torch.Tensor, image_tokens: torch.Tensor, caches: list | None = None) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x, image_tokens, *caches[index]) if caches is not None else layer(x, image_tokens)
        return self.ln_final(x)


class CaptionHead(nn.Module):
    """Stage `caption_head`: hidden (B, T, width) -> logits (B, T, V), or with targets the summed token
    cross-entropy over targets != ignore_index, fused so that the Triton path never builds the logits."""

    def __init__(self, cfg: CoCaConfig) -> None:
        super().__init__()
        self.kernels = cfg.kernels
        self.weight = nn.Parameter(torch.zeros(cfg.vocab_size, cfg.text_width))
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size)) if cfg.decoder_bias else None

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None, ignore_index: int = -100):
        if targets is None:
            return nn.functional.linear(hidden, self.weight, self.bias)
        return ops.linear_cross_entropy(
            hidden, self.weight, targets, bias=self.bias, ignore_index=ignore_index, reduction="sum",
            kernels=self.kernels,
        )
