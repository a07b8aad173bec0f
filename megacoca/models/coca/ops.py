"""The model's only door to compute kernels: attention, LayerNorm and the fused caption loss.

`kernels` is CoCaConfig.kernels: "auto" uses the Triton kernels (megacoca_kernels) on CUDA tensors and torch
elsewhere; "triton" always uses them (on a CPU through Triton's interpreter, for tests); "torch" never does.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(kernels: str, tensor: torch.Tensor) -> bool:
    if kernels == "torch":
        return False
    if kernels == "triton":
        if not _triton_available():
            raise RuntimeError("kernels='triton' needs the triton package; install it or use kernels='torch'")
        return True
    return tensor.is_cuda and _triton_available()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    kv_mask: torch.Tensor | None = None,
    kernels: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention on (B, H, L, D) tensors.

    causal: top-left aligned like SDPA's is_causal. kv_mask: bool (B, Lk), True where a key may be attended.
    A query row with no allowed key returns zeros.
    """
    if use_triton(kernels, q):
        from megacoca_kernels import flash_attention  # optional: Triton

        return flash_attention(q, k, v, causal=causal, kv_mask=kv_mask)
    if kv_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    mask = kv_mask[:, None, None, :]
    if causal:
        lq, lk = q.shape[-2], k.shape[-2]
        causal_mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
        mask = mask & causal_mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, kernels: str) -> torch.Tensor:
    if use_triton(kernels, x):
        from megacoca_kernels import layer_norm as triton_layer_norm  # optional: Triton

        return triton_layer_norm(x, weight, bias, eps=eps)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "sum",
    kernels: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T + bias` against `target`; the Triton path never builds the logits."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    target = target.reshape(-1)
    if use_triton(kernels, hidden):
        from megacoca_kernels import linear_cross_entropy as fused  # optional: Triton

        return fused(hidden, weight, target, bias=bias, ignore_index=ignore_index, reduction=reduction)
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)
