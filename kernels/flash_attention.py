"""Flash attention (forward and backward) in Triton, for CoCa's self-, causal- and cross-attention.

Layout is torch SDPA's: q (B, H, Lq, D), k and v (B, H, Lk, D), out (B, H, Lq, D).

- Any lengths >= 1 (77, 257, 577 ...), Lq != Lk allowed; tiles past the end are masked.
- Head dims 16..256. Triton's tiles are powers of two, so a head dim that is not one runs either padded to
  next_power_of_2(D) (masked loads, the padding multiplied as zeros) or, where that is less work, as two tiles:
  the largest power of two <= D plus the next power of two >= the rest, masked to D (`_head_dim_tiles`).
  CoCa giant's 88 runs as 64 + 32 = 96 columns instead of 128 (FlashAttention-2/3 also run it as 96), 72 as
  64 + 16, 40 as 32 + 16; powers of two run as one tile. Every dot product over the head dim is then the sum of
  the two tiles' (q k^T = q1 k1^T + q2 k2^T) and the out / dQ / dK / dV accumulators are kept as two tiles.
  `SPLIT_HEAD_DIM = False` pads every head dim instead (bench.py compares the two). The kernels are compiled
  per head dim and told when every stride is a multiple of 8 elements (the D and STRIDE_ALIGN constexprs), so
  that a row of 88 loads 16 bytes at a time (see flash_attention_kernels.py).
- `causal` is aligned top-left like SDPA's `is_causal`: query i sees keys j <= i.
- `kv_mask` (B, Lk) bool, True where a key may be attended. A query row with no visible key returns
  zeros (and zero gradients), never NaN: the running max is kept at a finite 0 while it is -inf, and
  the saved logsumexp of such a row is -inf, read back as +inf in the backward so that p = 0.
- fp32 / fp16 / bf16 inputs, fp32 accumulation; the backward is a delta = rowsum(dO * O) preprocess,
  a dK/dV kernel (one program per key block, looping over queries) and a dQ kernel (one program per
  query block, looping over keys): no atomics, deterministic, 7 tile matmuls. `DQ_ATOMIC = True` (or
  MEGACOCA_FLASH_DQ_ATOMIC=1) switches to FlashAttention-2's scheme instead: the dK/dV kernel also adds
  dQ into an fp32 buffer with atomics, 5 matmuls, not bit-reproducible. Which is faster on CoCa's short
  sequences is for bench.py to say.
- GPU tiles are autotuned per (Lq, Lk, head-dim tiles, flags); under the interpreter one 32x32 tile is used.

Scores are kept in base 2: s = q.k * softmax_scale * log2(e), so exp2 replaces exp; the saved
logsumexp is in the same units.

This file holds the launchers, the autograd Function, the op and its eager reference; the Triton kernels
themselves are in flash_attention_kernels.py.
"""

from __future__ import annotations

import math
import os

import torch
import triton

from ._utils import check_device, dot_precision, empty, empty_like, interpreting, upcast_tiles
from .flash_attention_kernels import (
    _flash_attention_bwd_dkdv_kernel,
    _flash_attention_bwd_dq_kernel,
    _flash_attention_bwd_preprocess_kernel,
    _flash_attention_fwd_kernel,
)

LOG2E = 1.4426950408889634


# ------------------------------------------------------------------------------------------- launchers


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _mask_args(kv_mask: torch.Tensor | None, q: torch.Tensor):
    if kv_mask is None:
        return q, 0, False  # dummy pointer, never read
    return kv_mask, kv_mask.stride(0), True


def _stride_align(*tensors: torch.Tensor) -> int:
    """The kernels' STRIDE_ALIGN: 8 where every stride but the last is a multiple of 8 elements, so that a D = 88
    row (head stride 88) loads 16 bytes at a time (see flash_attention_kernels.py); 1 where one is not, and where
    all are multiples of 16, which Triton specializes on by itself (the power-of-two head dims' kernels as before).
    """
    strides = [s for t in tensors for s in t.stride()[:-1]]
    return 1 if all(s % 16 == 0 for s in strides) or any(s % 8 for s in strides) else 8


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))  # tl.dot needs every tile side >= 16


# Whether a head dim that is not a power of two may run as two power-of-two tiles (see the module docstring).
# Read at each launch; False pads it to one tile of next_power_of_2(D), as before issue 24.
SPLIT_HEAD_DIM = True


def _head_dim_tiles(d: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_D2): the head dim's tile widths, BLOCK_D2 = 0 for one tile.

    Two tiles, the largest power of two <= d and the rest rounded up to a power of two (>= 16), where their sum
    is less than one padded tile: 88 -> (64, 32), 72 -> (64, 16), 40 -> (32, 16); 64 -> (64, 0), 112 -> (128, 0)
    (64 + 64 saves nothing), 24 -> (32, 0).
    """
    whole = _block_d(d)
    if not SPLIT_HEAD_DIM:
        return whole, 0
    first = 1 << (d.bit_length() - 1)
    second = _block_d(d - first) if d > first else 0
    return (first, second) if second and first + second < whole else (whole, 0)


def flash_attention_fwd(q, k, v, causal: bool, kv_mask, softmax_scale: float):
    """Launch the forward kernel; returns (out (B, H, Lq, D), lse (B, H, Lq) fp32 in base-2 units)."""
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    out = empty((B, H, LQ, D), device=q.device, dtype=q.dtype)
    lse = empty((B, H, LQ), device=q.device, dtype=torch.float32)
    mask, stride_maskb, has_mask = _mask_args(kv_mask, q)
    block_d, block_d2 = _head_dim_tiles(D)
    grid = lambda meta: (triton.cdiv(LQ, meta["BLOCK_M"]), B * H)  # noqa: E731
    _flash_attention_fwd_kernel[grid](
        q, k, v, out, lse, mask,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        stride_maskb,
        H, LQ, LK, D, softmax_scale * LOG2E,
        CAUSAL=causal, HAS_KV_MASK=has_mask, UPCAST=upcast_tiles(q.dtype), DOT_PRECISION=dot_precision(q.dtype),
        STRIDE_ALIGN=_stride_align(q, k, v, out), BLOCK_D=block_d, BLOCK_D2=block_d2,
    )
    return out, lse


# How the backward computes dQ. False (default): a separate dQ kernel, no atomics, bit-deterministic, 7 tile
# matmuls in all. True: the dK/dV kernel adds dQ with fp32 atomics, 5 matmuls (FlashAttention-2's choice).
# Read at each backward call; the environment variable sets the default. bench.py measures both.
DQ_ATOMIC = os.environ.get("MEGACOCA_FLASH_DQ_ATOMIC", "0") == "1"


def flash_attention_bwd(do, q, k, v, out, lse, causal: bool, kv_mask, softmax_scale: float):
    """Launch the backward kernels; returns (dq, dk, dv) in the input dtype."""
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    do = _last_dim_contiguous(do)
    upcast, precision = upcast_tiles(q.dtype), dot_precision(q.dtype)
    delta = empty((B, H, LQ), device=q.device, dtype=torch.float32)
    dk = empty_like(k)
    dv = empty_like(v)
    align = _stride_align(q, k, v, out, do, dk, dv)  # dq below is contiguous like dk: strides multiples of D
    pre_block = 32 if interpreting() else 64
    # Elementwise: one padded tile of the head dim wastes no FLOPs.
    _flash_attention_bwd_preprocess_kernel[(triton.cdiv(LQ, pre_block), B * H)](
        out, do, delta,
        out.stride(0), out.stride(1), out.stride(2), do.stride(0), do.stride(1), do.stride(2),
        H, LQ, D, STRIDE_ALIGN=align, BLOCK_M=pre_block, BLOCK_D=_block_d(D),
    )
    atomic = bool(DQ_ATOMIC)
    # fp32 dQ accumulator for the atomic path; a 1-element stand-in otherwise (the autotuner zeroes it).
    dq_acc = torch.zeros((B, H, LQ, D) if atomic else (1,), device=q.device, dtype=torch.float32)
    mask, stride_maskb, has_mask = _mask_args(kv_mask, q)
    block_d, block_d2 = _head_dim_tiles(D)
    common = dict(CAUSAL=causal, HAS_KV_MASK=has_mask, UPCAST=upcast, DOT_PRECISION=precision, STRIDE_ALIGN=align,
                  BLOCK_D=block_d, BLOCK_D2=block_d2)
    _flash_attention_bwd_dkdv_kernel[lambda meta: (triton.cdiv(LK, meta["BLOCK_N"]), B * H)](
        q, k, v, do, lse, delta, dk, dv, mask, dq_acc,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        stride_maskb,
        H, LQ, LK, D, softmax_scale * LOG2E, softmax_scale, DQ_ATOMIC=atomic, **common,
    )
    if atomic:
        return dq_acc.to(q.dtype), dk, dv
    dq = empty_like(q)
    _flash_attention_bwd_dq_kernel[lambda meta: (triton.cdiv(LQ, meta["BLOCK_M"]), B * H)](
        q, k, v, do, lse, delta, dq, mask,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        stride_maskb,
        H, LQ, LK, D, softmax_scale * LOG2E, softmax_scale, **common,
    )
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, kv_mask, softmax_scale):
        out, lse = flash_attention_fwd(q, k, v, causal, kv_mask, softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse, kv_mask)
        ctx.causal = causal
        ctx.softmax_scale = softmax_scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, kv_mask = ctx.saved_tensors
        dq, dk, dv = flash_attention_bwd(do, q, k, v, out, lse, ctx.causal, kv_mask, ctx.softmax_scale)
        return dq, dk, dv, None, None, None


def flash_attention(q, k, v, *, causal=False, kv_mask=None, softmax_scale=None):
    """softmax(q k^T * scale [+ causal / key-padding mask]) v, fused; same layout as torch SDPA.

    q: (B, H, Lq, D); k, v: (B, H, Lk, D); kv_mask: optional bool (B, Lk), True = key may be attended.
    Rows with no visible key return zeros.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"flash_attention expects (B, H, L, D) tensors, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    check_device(q, "flash_attention")
    B, H, LQ, D = q.shape
    if k.shape != (B, H, k.shape[2], D) or v.shape != k.shape:
        raise ValueError(f"k and v must be (B, H, Lk, D) matching q {tuple(q.shape)}; got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (16 <= D <= 256):
        raise ValueError(f"head dim {D} not supported (16..256)")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"q, k, v must share one of fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if kv_mask is not None:
        if kv_mask.shape != (B, k.shape[2]):
            raise ValueError(f"kv_mask must be (B, Lk) = {(B, k.shape[2])}, got {tuple(kv_mask.shape)}")
        # bool storage read as bytes: no copy unless the mask itself is strided.
        kv_mask = kv_mask.to(torch.bool).contiguous().view(torch.uint8)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(D)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return FlashAttentionFunction.apply(q, k, v, bool(causal), kv_mask, float(softmax_scale))


def flash_attention_ref(q, k, v, *, causal=False, kv_mask=None, softmax_scale=None):
    """Eager reference, computed in the input dtype like torch would (upcast the inputs for an fp32 one).

    Rows with no visible key give zeros (SDPA gives NaN there).
    """
    D = q.shape[-1]
    LQ, LK = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    allowed = torch.ones(LQ, LK, dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.tril(allowed)
    allowed = allowed.expand(q.shape[0], 1, LQ, LK)
    if kv_mask is not None:
        allowed = allowed & kv_mask[:, None, None, :].to(torch.bool)
    empty_row = ~allowed.any(-1, keepdim=True)
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(empty_row, 0.0)
    p = torch.softmax(scores.float(), dim=-1).to(q.dtype).masked_fill(empty_row, 0.0)
    return torch.matmul(p, v)
