"""Attentional poolers over the image tokens, in the paper's cascade or open_clip's single-pooler layout."""

from __future__ import annotations

import torch
import torch.nn as nn

from megacoca.config.model import CoCaConfig
from megacoca.models.coca.layers import Attention, LayerNorm


class AttentionalPooler(nn.Module):
    """One attention layer from learned queries (n, dim) to a context (B, N, context_dim)."""

    def __init__(self, dim: int, context_dim: int, heads: int, queries: int, eps: float, kernels: str) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(queries, dim))
        self.ln_q = LayerNorm(dim, eps, kernels)
        self.ln_k = LayerNorm(context_dim, eps, kernels)
        self.attn = Attention(dim, heads, kv_dim=context_dim, kernels=kernels)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        query = self.ln_q(self.query.to(context.dtype)).expand(context.shape[0], -1, -1)
        return self.attn(query, self.ln_k(context))


class ImagePooler(nn.Module):
    """Stage `pool_image`: image tokens -> (contrastive embedding (B, E), caption tokens (B, Q, pooled_width)).

    paper: a `caption_queries`-query pooler gives the caption tokens; a 1-query contrastive pooler cascaded on
    them gives the embedding (`pooler_cascade=False`: the contrastive pooler reads the image tokens too).
    open_clip: one pooler, then ln_post on all queries; query 0 is the contrastive embedding and queries 1.. the
    caption tokens.
    """

    def __init__(self, cfg: CoCaConfig) -> None:
        super().__init__()
        self.layout = cfg.pooler_layout
        self.cascade = cfg.pooler_cascade
        width = cfg.pooled_width
        args = dict(heads=cfg.pooler_heads, eps=cfg.ln_eps, kernels=cfg.kernels)
        self.caption_pooler = AttentionalPooler(width, cfg.vision_width, queries=cfg.caption_queries, **args)
        self.contrastive_pooler = (
            AttentionalPooler(width, width if cfg.pooler_cascade else cfg.vision_width, queries=1, **args)
            if self.layout == "paper" else None
        )
        self.ln_post = LayerNorm(width, cfg.ln_eps, cfg.kernels)
        self.projection = nn.Linear(width, cfg.embed_dim, bias=False)

    def forward(self, image_tokens: torch.Tensor,
                contrastive: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """`contrastive=False` (captioning-only training) skips what only the contrastive embedding needs (the
        contrastive pooler, the projection) and returns None for it."""
        pooled = self.caption_pooler(image_tokens)
        if self.contrastive_pooler is not None:
            caption_tokens = pooled
            if not contrastive:
                return None, caption_tokens
            context = caption_tokens if self.cascade else image_tokens
            embedding = self.ln_post(self.contrastive_pooler(context)[:, 0])
        else:
            pooled = self.ln_post(pooled)
            embedding, caption_tokens = pooled[:, 0], pooled[:, 1:]
            if not contrastive:
                return None, caption_tokens
        return self.projection(embedding), caption_tokens
