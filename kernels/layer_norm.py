"""LayerNorm over the last dimension in Triton: fused forward, fused backward.

Forward: BLOCK_M rows per program, each whole in registers (BLOCK_N = next_power_of_2(N)); saves the
fp32 mean and 1/std per row. Backward: a fixed number of programs, each walking a contiguous run of rows; dx
is written per row, dweight and dbias are summed in fp32 registers and written as one partial row per
program, then reduced with one small torch sum (no atomics, deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import check_device, empty, interpreting

MAX_FUSED_BYTES = 65536


@triton.jit
def _layer_norm_fwd_kernel(
    X, Y, W, B, MEAN, RSTD,
    stride_x, stride_y, M, N, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """BLOCK_M rows per program, each row whole in registers (several rows per program for narrow N)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, 1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, 1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _layer_norm_bwd_kernel(
    X, W, DY, DX, MEAN, RSTD, DW_PARTIAL, DB_PARTIAL,
    stride_x, stride_dy, stride_dx, M, N, rows_per_program,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    # Walk the rows by advancing 64-bit pointers (no int32 row * stride overflow on big activations).
    x_ptrs = X + row_start.to(tl.int64) * stride_x + cols
    dy_ptrs = DY + row_start.to(tl.int64) * stride_dy + cols
    dx_ptrs = DX + row_start.to(tl.int64) * stride_dx + cols
    for row in range(row_start, row_end):
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptrs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        if HAS_WEIGHT:
            wdy = w * dy
            dw += dy * xhat
        else:
            wdy = dy
        if HAS_BIAS:
            db += dy
        c1 = tl.sum(xhat * wdy, 0) / N
        c2 = tl.sum(wdy, 0) / N
        dx = (wdy - (xhat * c1 + c2)) * rstd
        tl.store(dx_ptrs, dx.to(DX.dtype.element_ty), mask=mask)
        x_ptrs += stride_x
        dy_ptrs += stride_dy
        dx_ptrs += stride_dx
    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + pid.to(tl.int64) * N + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + pid.to(tl.int64) * N + cols, db, mask=mask)


def _launch_params(x: torch.Tensor, N: int) -> tuple[int, int]:
    block_n = triton.next_power_of_2(N)
    if block_n * x.element_size() > MAX_FUSED_BYTES:
        raise ValueError(f"layer_norm: feature dim {N} too large for the fused kernel (max {MAX_FUSED_BYTES} bytes)")
    num_warps = min(max(block_n // 256, 1), 16)
    return block_n, num_warps


def layer_norm_fwd(x2d, weight, bias, eps):
    """x2d (M, N) with unit last stride -> (y (M, N), mean (M,), rstd (M,)) fp32 statistics."""
    M, N = x2d.shape
    block_n, num_warps = _launch_params(x2d, N)
    # Rows per program: a few thousand elements per program on a GPU (narrow rows share a program); under the
    # interpreter, fewer and larger programs are faster.
    block_m = max(1, min(64 if interpreting() else 16, (8192 if interpreting() else 4096) // block_n))
    y = empty((M, N), device=x2d.device, dtype=x2d.dtype)
    mean = empty(M, device=x2d.device, dtype=torch.float32)
    rstd = empty(M, device=x2d.device, dtype=torch.float32)
    _layer_norm_fwd_kernel[(triton.cdiv(M, block_m),)](
        x2d, y, weight if weight is not None else x2d, bias if bias is not None else x2d, mean, rstd,
        x2d.stride(0), y.stride(0), M, N, eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return y, mean, rstd


def _num_programs(M: int, device: torch.device) -> int:
    if interpreting() or device.type != "cuda":
        return max(1, min(M, 4))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(M, 4 * sms))


def layer_norm_bwd(dy2d, x2d, weight, bias, mean, rstd):
    M, N = x2d.shape
    block_n, num_warps = _launch_params(x2d, N)
    dy2d = dy2d if dy2d.stride(-1) == 1 else dy2d.contiguous()
    dx = empty((M, N), device=x2d.device, dtype=x2d.dtype)
    programs = _num_programs(M, x2d.device)
    rows_per_program = triton.cdiv(M, programs)
    dw_partial = empty((programs, N), device=x2d.device, dtype=torch.float32) if weight is not None else None
    db_partial = empty((programs, N), device=x2d.device, dtype=torch.float32) if bias is not None else None
    _layer_norm_bwd_kernel[(programs,)](
        x2d, weight if weight is not None else x2d, dy2d, dx, mean, rstd,
        dw_partial if dw_partial is not None else mean, db_partial if db_partial is not None else mean,
        x2d.stride(0), dy2d.stride(0), dx.stride(0), M, N, rows_per_program,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_N=block_n, num_warps=num_warps,
    )
    dw = dw_partial.sum(0).to(weight.dtype) if weight is not None else None
    db = db_partial.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dw, db


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        y, mean, rstd = layer_norm_fwd(x2d, weight, bias, eps)
        ctx.save_for_backward(x2d, weight, bias, mean, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = layer_norm_bwd(dy.reshape(-1, x2d.shape[-1]), x2d, weight, bias, mean, rstd)
        return dx.view(dy.shape), dw, db, None


def layer_norm(x, weight, bias, eps=1e-5):
    """LayerNorm over the last dim of x (any leading dims); weight and bias (N,) or None."""
    check_device(x, "layer_norm")
    N = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (N,):
            raise ValueError(f"layer_norm: {name} must be ({N},), got {tuple(t.shape)}")
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    return LayerNormFunction.apply(x, weight, bias, float(eps))


def layer_norm_ref(x, weight, bias, eps=1e-5):
    """Plain torch reference."""
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)
