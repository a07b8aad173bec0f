"""Unimodal text decoder: causal self-attention over the text with a learnable CLS token appended at the end."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megacoca.config.model import CoCaConfig
from megacoca.models.coca.layers import LayerNorm, SelfAttentionBlock


class TextEmbedding(nn.Module):
    """Stage `embed_text`: token ids (B, L) -> embeddings (B, L + 1, width), the CLS last.

    With `with_cls=False` (cached generation) no CLS is appended and positions start at `position_offset`.
    `cls_position` places the CLS at a later position than right after `text` (text trimmed of padding
    keeps the CLS where the full-length text put it).
    """

    def __init__(self, cfg: CoCaConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.context_length + 1, cfg.text_width))
        self.cls_embedding = nn.Parameter(torch.zeros(cfg.text_width))

    def forward(
        self, text: torch.Tensor, with_cls: bool = True, position_offset: int = 0, cls_position: int | None = None
    ) -> torch.Tensor:
        length = text.shape[1]
        cls_position = length if cls_position is None else cls_position
        positions = position_offset + (cls_position + 1 if with_cls else length)
        if positions > self.positional_embedding.shape[0]:
            raise ValueError(
                f"text of {positions} positions (CLS included) exceeds the model's "
                f"{self.positional_embedding.shape[0]}"
            )
        positional = self.positional_embedding.to(self.token_embedding.weight.dtype)
        x = self.token_embedding(text) + positional[position_offset : position_offset + length]
        if with_cls:
            cls = self.cls_embedding.to(x.dtype) + positional[cls_position]
            x = torch.cat([x, cls.expand(x.shape[0], 1, -1)], dim=1)
        return x


class TextOutputs(nn.Module):
    """Stage `text_outputs`: block outputs (B, L + 1, width) -> (text embedding (B, E), token outputs (B, L, width))."""

    def __init__(self, cfg: CoCaConfig) -> None:
        super().__init__()
        self.tokens_after_ln = cfg.text_tokens_after_ln
        self.ln_final = LayerNorm(cfg.text_width, cfg.ln_eps, cfg.kernels)
        self.projection = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.projection(self.ln_final(x[:, -1]))
        tokens = x[:, :-1]
        return embedding, self.ln_final(tokens) if self.tokens_after_ln else tokens

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Token outputs alone (cached generation, no CLS in x)."""
        return self.ln_final(x) if self.tokens_after_ln else x


def text_key_mask(text: torch.Tensor, pad_id: int, legacy_cls_mask: bool) -> torch.Tensor:
    """Which keys of the unimodal stage (L text tokens + CLS) may be attended, bool (B, L + 1); the stage is
    causal on top of it, so it runs on the flash kernel in both layouts.

    Default: no query (real token, pad or CLS) attends to a pad key; the CLS sees every real token and itself.
    legacy_cls_mask (open_clip's correct_cls_mask=False): open_clip builds its pad mask as [CLS-valid, token
    valid...], one key off, and applies it to every query row: key 0 always, key j when token j-1 is real.
    Real-token rows are unaffected (causal already hides later keys); pad rows see keys up to the first pad;
    the CLS row sees the first pad, not itself, on padded text.
    """
    real = text != pad_id
    if legacy_cls_mask:
        return F.pad(real, (1, 0), value=True)
    return F.pad(real, (0, 1), value=True)


def kept_text_length(text: torch.Tensor, pad_id: int, legacy_cls_mask: bool, multiple: int = 8) -> int:
    """How many leading positions of `text` a training forward must keep: through the batch's last real token
    (one more with the legacy mask, whose CLS sees the first pad), rounded up to `multiple`, at most L."""
    length = text.shape[1]
    real_columns = (text != pad_id).any(dim=0).nonzero()
    last = int(real_columns.max()) + 1 if real_columns.numel() else 1
    keep = max(last + int(legacy_cls_mask), 2)
    return min(length, -(-keep // multiple) * multiple)


class TextEncoder(nn.Module):
    """Stages `embed_text`, `text_blocks` and `text_outputs`."""

    def __init__(self, cfg: CoCaConfig) -> None:
        super().__init__()
        self.pad_id = cfg.pad_id
        self.legacy_cls_mask = cfg.legacy_cls_mask
        self.embed = TextEmbedding(cfg)
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(cfg.text_width, cfg.text_heads, cfg.text_mlp_dim, cfg.ln_eps, cfg.kernels)
            for _ in range(cfg.text_layers)
        )
        self.outputs = TextOutputs(cfg)

    def forward(self, text: torch.Tensor, keep: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(text embedding, token outputs); with `keep` only the first `keep` tokens are run (the rest must
        be padding: see kept_text_length), the CLS staying at position L."""
        length = text.shape[1]
        if keep is not None and keep < length:
            text = text[:, :keep]
        kv_mask = text_key_mask(text, self.pad_id, self.legacy_cls_mask)
        x = self.embed(text, cls_position=length)
        for block in self.blocks:
            x = block(x, causal=True, kv_mask=kv_mask)
        return self.outputs(x)

    def forward_cached(self, text: torch.Tensor, caches: list, position_offset: int) -> torch.Tensor:
        """Token outputs of new tokens (B, T, width) given the caches of earlier ones; no CLS, no padding."""
        x = self.embed(text, with_cls=False, position_offset=position_offset)
        for block, cache in zip(self.blocks, caches):
            x = block(x, causal=True, cache=cache)
        return self.outputs.tokens(x)
