"""Fused Triton kernels for CoCa, imported as `megacoca_kernels`.

- `flash_attention(q, k, v, *, causal=False, kv_mask=None, softmax_scale=None)`
- `layer_norm(x, weight, bias, eps=1e-5)`
- `linear_cross_entropy(hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean", vocab_start=0,
  vocab_valid=None, tp_group=None)`: with `tp_group`, `weight` is this rank's vocabulary shard (vocabulary
  parallelism; the full logits are never built on any rank)

Each op's file holds its kernels, launcher, autograd Function and a plain torch `*_ref`; flash attention's
Triton kernels are in their own file (flash_attention_kernels.py), to keep both files short.

On a machine without a GPU the kernels run through Triton's interpreter: set `TRITON_INTERPRET=1` before
this package is imported (Triton decides interpreted vs compiled when the kernels are defined).
"""

from .flash_attention import flash_attention, flash_attention_ref
from .layer_norm import layer_norm, layer_norm_ref
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref

__all__ = [
    "flash_attention",
    "flash_attention_ref",
    "layer_norm",
    "layer_norm_ref",
    "linear_cross_entropy",
    "linear_cross_entropy_ref",
]
