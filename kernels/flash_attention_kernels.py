"""The Triton kernels of flash attention (kernels/flash_attention.py launches them and holds the autograd
Function, the public op and its reference; the algorithm is described there).

- `_flash_attention_fwd_kernel`: one program per (query block, batch x head), an online softmax over the key
  blocks (`_flash_attention_fwd_inner`, run once over the blocks that need no mask and once over the rest);
  writes the output and the base-2 logsumexp.
- `_flash_attention_bwd_preprocess_kernel`: delta = rowsum(dO * O).
- `_flash_attention_bwd_dkdv_kernel`: one program per key block, looping over queries (and, with DQ_ATOMIC,
  adding dQ with fp32 atomics).
- `_flash_attention_bwd_dq_kernel`: one program per query block, looping over keys.

The head dim is one or two tiles wide, each a power of two (tl.arange's lengths must be): columns [0, BLOCK_D)
and, where BLOCK_D2 > 0, [BLOCK_D, BLOCK_D + BLOCK_D2), both masked to D. A product over the head dim is the sum
of the two parts' (q k^T = q1 k1^T + q2 k2^T, chained into one accumulator), and every (rows, D) accumulator
(out, dq, dk, dv) is kept as two tiles. Without a second part nothing of the second is built (in the forward,
the `*2` arguments of `_flash_attention_fwd_inner` are stand-ins that no constexpr branch reads), so the
one-tile kernels are those of a single BLOCK_D.

D itself is a constexpr, so the compiler knows how the masks against it fall, and STRIDE_ALIGN = 8 says that
every batch, head and row stride is a multiple of 8 elements (the launcher checks). Triton specializes integer
arguments only on divisibility by 16, which 88 and a head stride of 88 never have: without the two, every load
of a D = 88 tile is a 2-byte one, without cp.async; with them, 16-byte loads (64 + 32 columns masked to 88 fall
in runs of 8).

GPU tiles are autotuned per (Lq, Lk, head-dim tiles, flags) from `_configs`, pruned by `_prune` for the head
dim's shared memory; under the interpreter one 32x32 tile is used.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from ._utils import interpreting


def _configs(kind: str) -> list[triton.Config]:
    if interpreting():
        # One small config: autotuning needs a GPU, and small tiles keep the interpreter fast while still
        # giving several blocks (and a ragged tail) on the test lengths.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    if os.environ.get("MEGACOCA_KERNELS_TUNE", "1") == "0":
        # Correctness runs on a GPU (the GPU check's compiled kernel tests): one small tile per kernel, compiled
        # once per variant instead of eight times over for the autotuner (~125 variants in tests/kernels); the tiles
        # kernels/compile_check.py compiles for the widest head dims, the smallest of the autotuned ones
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32} if kind == "fwd" else {"BLOCK_M": 32, "BLOCK_N": 64},
                              num_warps=4, num_stages=2)]
    if kind == "fwd":
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [
                (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3),
                (128, 32, 4, 3), (64, 32, 4, 2), (64, 64, 4, 2), (128, 64, 8, 2),
            ]
        ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (64, 128, 8, 2),
            (32, 128, 4, 2), (128, 64, 8, 2), (32, 32, 4, 1), (64, 32, 4, 1),
        ]
    ]


def _prune(configs, named_args, **kwargs):
    """Drop tiles whose q/k/v + accumulator footprint is too large for the head dim (shared memory)."""
    if len(configs) == 1:
        return configs
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D")) + kwargs.get("BLOCK_D2", named_args.get("BLOCK_D2"))
    budget = 128 * 128 if block_d <= 64 else 128 * 64 if block_d <= 128 else 64 * 64
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= budget]
    if block_d > 128:
        kept = [c for c in kept if c.num_stages <= 2]
    return kept or configs[-1:]


@triton.jit
def _load_tile(base, rows, stride, row_ok, offs_d, d_mask, UPCAST: tl.constexpr):
    """The (rows, head-dim part) tile at base, zero past the length and past D; fp32 if UPCAST."""
    tile = tl.load(base + rows[:, None] * stride + offs_d[None, :], mask=row_ok[:, None] & d_mask[None, :],
                   other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _head(ptr, off_b, off_h, stride_b, stride_h, stride_row, STRIDE_ALIGN: tl.constexpr):
    """This program's (batch, head) slice of a (B, H, L, D) tensor: its base pointer and its row stride, the
    strides known to the compiler as multiples of STRIDE_ALIGN (x // a * a is x when a divides it)."""
    if STRIDE_ALIGN > 1:
        stride_b = stride_b // STRIDE_ALIGN * STRIDE_ALIGN
        stride_h = stride_h // STRIDE_ALIGN * STRIDE_ALIGN
        stride_row = stride_row // STRIDE_ALIGN * STRIDE_ALIGN
    return ptr + off_b * stride_b + off_h * stride_h, stride_row


# --------------------------------------------------------------------------------------------- forward


@triton.jit
def _load_kt(k_base, cols, col_ok, stride_kn, offs_d, d_mask, BOUNDARY_MASK: tl.constexpr, UPCAST: tl.constexpr):
    """K^T's (head-dim part, BLOCK_N) tile; the key bound is left out where the whole block is in range."""
    if BOUNDARY_MASK:
        kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None],
                     mask=col_ok[None, :] & d_mask[:, None], other=0.0)
    else:
        kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None], mask=d_mask[:, None], other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
    return kt


@triton.jit
def _load_v(v_base, cols, col_ok, stride_vn, offs_d, d_mask, BOUNDARY_MASK: tl.constexpr, UPCAST: tl.constexpr):
    """V's (BLOCK_N, head-dim part) tile; the key bound is left out where the whole block is in range."""
    if BOUNDARY_MASK:
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :],
                    mask=col_ok[:, None] & d_mask[None, :], other=0.0)
    else:
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=d_mask[None, :], other=0.0)
    if UPCAST:
        v = v.to(tl.float32)
    return v


@triton.jit
def _flash_attention_fwd_inner(
    acc, acc2, l_i, m_i, q, q2, k_base, v_base, mask_base, stride_kn, stride_vn,
    offs_m, offs_d, d_mask, offs_d2, d_mask2, start, end, LK, qk_scale,
    CAUSAL_MASK: tl.constexpr, BOUNDARY_MASK: tl.constexpr, HAS_KV_MASK: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D2: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < LK
        kt = _load_kt(k_base, cols, col_ok, stride_kn, offs_d, d_mask, BOUNDARY_MASK, UPCAST)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION)
        if BLOCK_D2 > 0:
            kt2 = _load_kt(k_base, cols, col_ok, stride_kn, offs_d2, d_mask2, BOUNDARY_MASK, UPCAST)
            s = tl.dot(q2, kt2, s, input_precision=DOT_PRECISION)
        s = s * qk_scale
        if BOUNDARY_MASK:
            s = tl.where(col_ok[None, :], s, float("-inf"))
        if CAUSAL_MASK:
            s = tl.where(cols[None, :] <= offs_m[:, None], s, float("-inf"))
        if HAS_KV_MASK:
            keep = tl.load(mask_base + cols, mask=col_ok, other=0) != 0
            s = tl.where(keep[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key keeps m = -inf; subtract 0 then so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _load_v(v_base, cols, col_ok, stride_vn, offs_d, d_mask, BOUNDARY_MASK, UPCAST)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        if BLOCK_D2 > 0:
            acc2 = acc2 * alpha[:, None]
            v2 = _load_v(v_base, cols, col_ok, stride_vn, offs_d2, d_mask2, BOUNDARY_MASK, UPCAST)
            acc2 = tl.dot(p.to(v2.dtype), v2, acc2, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, acc2, l_i, m_i


@triton.autotune(configs=_configs("fwd"), key=["LQ", "LK", "BLOCK_D", "BLOCK_D2", "CAUSAL", "HAS_KV_MASK"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _flash_attention_fwd_kernel(
    Q, K, V, OUT, LSE, KV_MASK,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_maskb,
    H, LQ, LK, D: tl.constexpr, qk_scale,
    CAUSAL: tl.constexpr, HAS_KV_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    STRIDE_ALIGN: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    q_base, stride_qm = _head(Q, off_b, off_h, stride_qb, stride_qh, stride_qm, STRIDE_ALIGN)
    k_base, stride_kn = _head(K, off_b, off_h, stride_kb, stride_kh, stride_kn, STRIDE_ALIGN)
    v_base, stride_vn = _head(V, off_b, off_h, stride_vb, stride_vh, stride_vn, STRIDE_ALIGN)
    o_base, stride_om = _head(OUT, off_b, off_h, stride_ob, stride_oh, stride_om, STRIDE_ALIGN)
    mask_base = KV_MASK + off_b * stride_maskb

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    row_ok = offs_m < LQ
    q = _load_tile(q_base, offs_m, stride_qm, row_ok, offs_d, d_mask, UPCAST)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offs_d2, d_mask2, q2, acc2 = offs_d, d_mask, q, acc  # stand-ins (see the module docstring)
    if BLOCK_D2 > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        d_mask2 = offs_d2 < D
        q2 = _load_tile(q_base, offs_m, stride_qm, row_ok, offs_d2, d_mask2, UPCAST)
        acc2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Keys [0, free_end) need no boundary or causal mask; [free_end, hi) are masked.
    full_end = (LK // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(LK, start_m + BLOCK_M)
        free_end = tl.minimum(full_end, ((start_m + 1) // BLOCK_N) * BLOCK_N)
    else:
        hi = LK
        free_end = full_end
    acc, acc2, l_i, m_i = _flash_attention_fwd_inner(
        acc, acc2, l_i, m_i, q, q2, k_base, v_base, mask_base, stride_kn, stride_vn,
        offs_m, offs_d, d_mask, offs_d2, d_mask2, 0, free_end, LK, qk_scale,
        False, False, HAS_KV_MASK, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_D2)
    acc, acc2, l_i, m_i = _flash_attention_fwd_inner(
        acc, acc2, l_i, m_i, q, q2, k_base, v_base, mask_base, stride_kn, stride_vn,
        offs_m, offs_d, d_mask, offs_d2, d_mask2, free_end, hi, LK, qk_scale,
        CAUSAL, True, HAS_KV_MASK, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_D2)

    # Fully masked rows: l = 0, acc = 0 -> output 0, logsumexp = -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :], (acc / l_safe[:, None]).to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & d_mask[None, :])
    if BLOCK_D2 > 0:
        tl.store(o_base + offs_m[:, None] * stride_om + offs_d2[None, :],
                 (acc2 / l_safe[:, None]).to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_mask2[None, :])
    tl.store(LSE + off_bh.to(tl.int64) * LQ + offs_m, lse, mask=row_ok)


# -------------------------------------------------------------------------------------------- backward


@triton.jit
def _flash_attention_bwd_preprocess_kernel(
    OUT, DO, DELTA,
    stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
    H, LQ, D: tl.constexpr,
    STRIDE_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO[i, d] * O[i, d], in fp32 (elementwise: one tile of next_power_of_2(D))."""
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    o_base, stride_om = _head(OUT, off_b, off_h, stride_ob, stride_oh, stride_om, STRIDE_ALIGN)
    do_base, stride_dom = _head(DO, off_b, off_h, stride_dob, stride_doh, stride_dom, STRIDE_ALIGN)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < LQ) & (offs_d[None, :] < D)
    o = tl.load(o_base + offs_m[:, None] * stride_om + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + off_bh.to(tl.int64) * LQ + offs_m, tl.sum(o * do, 1), mask=offs_m < LQ)


@triton.jit
def _load_lse(LSE, rows, LQ):
    # Rows past the end and fully masked rows (lse = -inf) read as +inf so that p = exp2(s - lse) = 0.
    lse = tl.load(LSE + rows, mask=rows < LQ, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse)


@triton.autotune(configs=_configs("bwd"),
                 key=["LQ", "LK", "BLOCK_D", "BLOCK_D2", "CAUSAL", "HAS_KV_MASK", "DQ_ATOMIC"],
                 prune_configs_by={"early_config_prune": _prune}, reset_to_zero=["DQ_ACC"])
@triton.jit
def _flash_attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KV_MASK, DQ_ACC,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_maskb,
    H, LQ, LK, D: tl.constexpr, qk_scale, softmax_scale,
    CAUSAL: tl.constexpr, HAS_KV_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DQ_ATOMIC: tl.constexpr, STRIDE_ALIGN: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per key block: dV = P^T dO, dK = scale * dS^T Q, looping over query blocks.

    With DQ_ATOMIC it also adds each tile's dQ = scale * dS K into the fp32 buffer DQ_ACC (B*H, Lq, D) with
    atomics (FlashAttention-2's scheme: 5 matmuls per tile instead of 7, but not bit-deterministic).
    """
    start_n = tl.program_id(0) * BLOCK_N
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    q_base, stride_qm = _head(Q, off_b, off_h, stride_qb, stride_qh, stride_qm, STRIDE_ALIGN)
    do_base, stride_dom = _head(DO, off_b, off_h, stride_dob, stride_doh, stride_dom, STRIDE_ALIGN)
    k_base, stride_kn = _head(K, off_b, off_h, stride_kb, stride_kh, stride_kn, STRIDE_ALIGN)
    v_base, stride_vn = _head(V, off_b, off_h, stride_vb, stride_vh, stride_vn, STRIDE_ALIGN)
    dk_base, stride_dkn = _head(DK, off_b, off_h, stride_dkb, stride_dkh, stride_dkn, STRIDE_ALIGN)
    dv_base, stride_dvn = _head(DV, off_b, off_h, stride_dvb, stride_dvh, stride_dvn, STRIDE_ALIGN)
    dq_base = DQ_ACC + off_bh.to(tl.int64) * LQ * D
    lse_base = LSE + off_bh.to(tl.int64) * LQ
    delta_base = DELTA + off_bh.to(tl.int64) * LQ

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    col_ok = offs_n < LK
    k = _load_tile(k_base, offs_n, stride_kn, col_ok, offs_d, d_mask, UPCAST)
    v = _load_tile(v_base, offs_n, stride_vn, col_ok, offs_d, d_mask, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if BLOCK_D2 > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        d_mask2 = offs_d2 < D
        k2 = _load_tile(k_base, offs_n, stride_kn, col_ok, offs_d2, d_mask2, UPCAST)
        v2 = _load_tile(v_base, offs_n, stride_vn, col_ok, offs_d2, d_mask2, UPCAST)
        dk2 = tl.zeros([BLOCK_N, BLOCK_D2], dtype=tl.float32)
        dv2 = tl.zeros([BLOCK_N, BLOCK_D2], dtype=tl.float32)
    key_ok = col_ok
    if HAS_KV_MASK:
        key_ok = key_ok & (tl.load(KV_MASK + off_b * stride_maskb + offs_n, mask=col_ok, other=0) != 0)

    lo = 0
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M  # earlier query blocks cannot see these keys
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(lo, LQ, BLOCK_M):
        rows = start_m + offs_m0
        row_ok = rows < LQ
        q = _load_tile(q_base, rows, stride_qm, row_ok, offs_d, d_mask, UPCAST)
        do = _load_tile(do_base, rows, stride_dom, row_ok, offs_d, d_mask, UPCAST)
        lse = _load_lse(lse_base, rows, LQ)
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        # Transposed scores (BLOCK_N, BLOCK_M) so that dV and dK come out with keys as rows.
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        if BLOCK_D2 > 0:
            q2 = _load_tile(q_base, rows, stride_qm, row_ok, offs_d2, d_mask2, UPCAST)
            do2 = _load_tile(do_base, rows, stride_dom, row_ok, offs_d2, d_mask2, UPCAST)
            st = tl.dot(k2, tl.trans(q2), st, input_precision=DOT_PRECISION)
        st = st * qk_scale
        visible = key_ok[:, None]
        if CAUSAL:
            visible = visible & (offs_n[:, None] <= rows[None, :])
        st = tl.where(visible, st, float("-inf"))
        pt = tl.exp2(st - lse[None, :])
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if BLOCK_D2 > 0:
            dv2 = tl.dot(pt.to(do2.dtype), do2, dv2, input_precision=DOT_PRECISION)
            dpt = tl.dot(v2, tl.trans(do2), dpt, input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
        if BLOCK_D2 > 0:
            dk2 = tl.dot(dst.to(q2.dtype), q2, dk2, input_precision=DOT_PRECISION)
        if DQ_ATOMIC:
            dq = tl.dot(tl.trans(dst).to(k.dtype), k, input_precision=DOT_PRECISION) * softmax_scale
            tl.atomic_add(dq_base + rows[:, None] * D + offs_d[None, :], dq, mask=row_ok[:, None] & d_mask[None, :])
            if BLOCK_D2 > 0:
                dq2 = tl.dot(tl.trans(dst).to(k2.dtype), k2, input_precision=DOT_PRECISION) * softmax_scale
                tl.atomic_add(dq_base + rows[:, None] * D + offs_d2[None, :], dq2,
                              mask=row_ok[:, None] & d_mask2[None, :])
    kv_tile_mask = col_ok[:, None] & d_mask[None, :]
    tl.store(dk_base + offs_n[:, None] * stride_dkn + offs_d[None, :], (dk * softmax_scale).to(DK.dtype.element_ty),
             mask=kv_tile_mask)
    tl.store(dv_base + offs_n[:, None] * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_tile_mask)
    if BLOCK_D2 > 0:
        kv_tile_mask2 = col_ok[:, None] & d_mask2[None, :]
        tl.store(dk_base + offs_n[:, None] * stride_dkn + offs_d2[None, :],
                 (dk2 * softmax_scale).to(DK.dtype.element_ty), mask=kv_tile_mask2)
        tl.store(dv_base + offs_n[:, None] * stride_dvn + offs_d2[None, :], dv2.to(DV.dtype.element_ty),
                 mask=kv_tile_mask2)


@triton.autotune(configs=_configs("bwd"), key=["LQ", "LK", "BLOCK_D", "BLOCK_D2", "CAUSAL", "HAS_KV_MASK"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _flash_attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KV_MASK,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_maskb,
    H, LQ, LK, D: tl.constexpr, qk_scale, softmax_scale,
    CAUSAL: tl.constexpr, HAS_KV_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    STRIDE_ALIGN: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per query block: dQ = scale * dS K, looping over key blocks."""
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    q_base, stride_qm = _head(Q, off_b, off_h, stride_qb, stride_qh, stride_qm, STRIDE_ALIGN)
    do_base, stride_dom = _head(DO, off_b, off_h, stride_dob, stride_doh, stride_dom, STRIDE_ALIGN)
    k_base, stride_kn = _head(K, off_b, off_h, stride_kb, stride_kh, stride_kn, STRIDE_ALIGN)
    v_base, stride_vn = _head(V, off_b, off_h, stride_vb, stride_vh, stride_vn, STRIDE_ALIGN)
    dq_base, stride_dqm = _head(DQ, off_b, off_h, stride_dqb, stride_dqh, stride_dqm, STRIDE_ALIGN)
    mask_base = KV_MASK + off_b * stride_maskb

    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < LQ
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = _load_tile(q_base, rows, stride_qm, row_ok, offs_d, d_mask, UPCAST)
    do = _load_tile(do_base, rows, stride_dom, row_ok, offs_d, d_mask, UPCAST)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if BLOCK_D2 > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        d_mask2 = offs_d2 < D
        q2 = _load_tile(q_base, rows, stride_qm, row_ok, offs_d2, d_mask2, UPCAST)
        do2 = _load_tile(do_base, rows, stride_dom, row_ok, offs_d2, d_mask2, UPCAST)
        dq2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
    lse = _load_lse(LSE + off_bh.to(tl.int64) * LQ, rows, LQ)
    delta = tl.load(DELTA + off_bh.to(tl.int64) * LQ + rows, mask=row_ok, other=0.0)

    hi = LK
    if CAUSAL:
        hi = tl.minimum(LK, start_m + BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n0
        col_ok = cols < LK
        k = _load_tile(k_base, cols, stride_kn, col_ok, offs_d, d_mask, UPCAST)
        v = _load_tile(v_base, cols, stride_vn, col_ok, offs_d, d_mask, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if BLOCK_D2 > 0:
            k2 = _load_tile(k_base, cols, stride_kn, col_ok, offs_d2, d_mask2, UPCAST)
            v2 = _load_tile(v_base, cols, stride_vn, col_ok, offs_d2, d_mask2, UPCAST)
            s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PRECISION)
            dp = tl.dot(do2, tl.trans(v2), dp, input_precision=DOT_PRECISION)
        s = s * qk_scale
        visible = col_ok[None, :]
        if HAS_KV_MASK:
            visible = visible & (tl.load(mask_base + cols, mask=col_ok, other=0) != 0)[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None])
        s = tl.where(visible, s, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
        if BLOCK_D2 > 0:
            dq2 = tl.dot(ds.to(k2.dtype), k2, dq2, input_precision=DOT_PRECISION)
    tl.store(dq_base + rows[:, None] * stride_dqm + offs_d[None, :], (dq * softmax_scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & d_mask[None, :])
    if BLOCK_D2 > 0:
        tl.store(dq_base + rows[:, None] * stride_dqm + offs_d2[None, :],
                 (dq2 * softmax_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_mask2[None, :])
