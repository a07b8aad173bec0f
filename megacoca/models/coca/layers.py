"""Transformer building blocks shared by the CoCa towers: pre-LN, exact GELU, biases, no dropout.

Attention keeps q, k and v as separate projections (open_clip's fused in_proj weights are split on load), and
reads its head count from its own weights (`view(b, l, -1, head_dim)`): megacoca.parallel swaps projections for
tensor-parallel shards that hold a subset of the heads, with no change here. Every parameter is read inside the
forward of the module that owns it, so that ZeRO-3 gathers it. Activation checkpointing is applied from outside
too (megacoca.parallel.parallelize), never by the blocks themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from megacoca.models.coca import ops


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose forward goes through ops.layer_norm (Triton or torch)."""

    def __init__(self, dim: int, eps: float = 1e-5, kernels: str = "auto") -> None:
        super().__init__(dim, eps=eps)
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps, self.kernels)


@dataclass
class KVCache:
    """Keys and values of one attention layer, (B, H, L, D) each; grows by one step per decoded token."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[-2]

    def reorder(self, index: torch.Tensor) -> None:
        if self.k is not None:
            self.k = self.k.index_select(0, index)
            self.v = self.v.index_select(0, index)


class Attention(nn.Module):
    """Multi-head attention; keys and values may come from a context of another width (cross-attention).

    The number of heads is not stored: it is the projections' output width / head_dim, so a tensor-parallel
    shard of the projections runs its own heads with this same code."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, kernels: str = "auto") -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        kv_dim = kv_dim or dim
        self.head_dim = dim // heads
        self.kernels = kernels
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(kv_dim, dim)
        self.v_proj = nn.Linear(kv_dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, -1, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        causal: bool = False,
        kv_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x (B, Lq, dim); context (B, Lk, kv_dim) or None for self-attention.

        With a cache, self-attention appends this step's keys and values to it (the prefill step is causal,
        a later single-token step attends to everything cached); cross-attention computes the context's keys
        and values once and reuses them.
        """
        q = self._split_heads(self.q_proj(x))
        if context is not None and cache is not None and cache.k is not None:
            k, v = cache.k, cache.v
        else:
            source = x if context is None else context
            k = self._split_heads(self.k_proj(source))
            v = self._split_heads(self.v_proj(source))
            if cache is not None:
                if context is None and cache.k is not None:
                    if causal and q.shape[2] > 1:
                        raise ValueError("a cached self-attention step takes one token at a time")
                    causal = False  # the one new query sees every cached key
                    k = torch.cat([cache.k, k], dim=2)
                    v = torch.cat([cache.v, v], dim=2)
                cache.k, cache.v = k, v
        out = ops.attention(q, k, v, causal=causal, kv_mask=kv_mask, kernels=self.kernels)
        batch, _, length, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SelfAttentionBlock(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)) unless mlp_dim is None."""

    def __init__(self, dim: int, heads: int, mlp_dim: int | None, eps: float, kernels: str) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(dim, eps, kernels)
        self.attn = Attention(dim, heads, kernels=kernels)
        self.ln_2 = LayerNorm(dim, eps, kernels) if mlp_dim else None
        self.mlp = MLP(dim, mlp_dim) if mlp_dim else None

    def forward(self, x, *, causal=False, kv_mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), causal=causal, kv_mask=kv_mask, cache=cache)
        if self.mlp is not None:
            x = x + self.mlp(self.ln_2(x))
        return x


class CrossAttentionBlock(nn.Module):
    """x + attn(ln_q(x), ln_kv(context)), then x + mlp(ln_2(x))."""

    def __init__(self, dim: int, heads: int, context_dim: int, mlp_dim: int, eps: float, kernels: str) -> None:
        super().__init__()
        self.ln_q = LayerNorm(dim, eps, kernels)
        self.ln_kv = LayerNorm(context_dim, eps, kernels)
        self.attn = Attention(dim, heads, kv_dim=context_dim, kernels=kernels)
        self.ln_2 = LayerNorm(dim, eps, kernels)
        self.mlp = MLP(dim, mlp_dim)

    def forward(self, x, context, *, cache=None):
        if cache is not None and cache.k is not None:
            attended = self.attn(self.ln_q(x), context, cache=cache)  # context keys/values come from the cache
        else:
            attended = self.attn(self.ln_q(x), self.ln_kv(context), cache=cache)
        x = x + attended
        return x + self.mlp(self.ln_2(x))
