"""flash_attention forward and backward against the eager reference, through Triton's interpreter.

Each case runs the kernel in the given dtype and compares outputs and (dq, dk, dv) with an fp64 reference;
the allowed error is twice what torch's own same-dtype computation makes, plus atol. Outputs are NaN-filled
before the kernels run (conftest), so an element a kernel forgets to write fails the test.
"""

import pytest
import torch
from kernel_asserts import assert_close_to_ref

from megacoca_kernels import flash_attention, flash_attention_ref

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# (B, H, Lq, Lk, D, causal, mask): mask None, "pad" (random padded keys) or "empty" (pad + one batch row
# with every key masked). Lengths are odd on purpose: 1, 7, 77, 257, never block multiples.
CASES = [
    (1, 2, 1, 1, 64, False, None),
    (1, 2, 1, 1, 64, True, "pad"),
    (2, 2, 7, 7, 88, True, None),
    (2, 2, 77, 77, 64, True, "pad"),  # text self-attention, causal + padding
    (2, 2, 77, 77, 128, False, None),
    (1, 2, 257, 257, 88, False, None),  # ViT self-attention, giant head dim
    (2, 2, 77, 257, 64, False, "pad"),  # cross-attention, Lq < Lk
    (2, 2, 257, 77, 128, False, "empty"),  # Lq > Lk with a fully masked batch row
    (2, 2, 7, 77, 88, True, None),  # causal, Lq < Lk (top-left aligned)
    (2, 2, 77, 7, 64, True, "empty"),  # causal, Lq > Lk, fully masked row
    (2, 1, 33, 65, 32, False, "empty"),
    (1, 1, 17, 40, 256, True, None),
]

# Head dims that are not powers of two (flash_attention._head_dim_tiles): 88 (CoCa giant), 72 and 40 run as two
# tiles (64 + 32, 64 + 16, 32 + 16), under every mask kind; 112 and 24 as one padded tile (128, 32).
HEAD_DIM_CASES = [
    (2, 3, 77, 129, 88, False, None),  # cross-attention shape
    (2, 3, 77, 129, 88, False, "pad"),
    (2, 3, 77, 129, 88, True, "empty"),  # causal, Lq < Lk, a fully masked batch row
    (2, 4, 64, 64, 88, False, None),  # self-attention
    (2, 4, 64, 64, 88, True, "pad"),
    (2, 2, 77, 77, 72, True, "pad"),
    (2, 2, 129, 33, 72, False, "empty"),
    (2, 2, 33, 65, 40, False, "pad"),
    (1, 2, 45, 17, 40, True, "empty"),  # causal, Lq > Lk
    (1, 2, 33, 47, 112, True, "pad"),
    (2, 1, 17, 17, 24, False, "empty"),
]


def _ids(case):
    B, H, LQ, LK, D, causal, mask = case
    return f"B{B}H{H}-q{LQ}-k{LK}-d{D}-{'causal' if causal else 'full'}-{mask or 'nomask'}"


def _make_mask(kind, B, LK, device):
    if kind is None:
        return None
    mask = torch.rand(B, LK, device=device) > 0.3
    mask[:, 0] = True  # every row keeps a key unless made empty below
    if kind == "empty":
        mask[-1] = False
    return mask


def _run(q, k, v, do, fn, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    return out, dq, dk, dv


def _check(B, H, LQ, LK, D, causal, mask_kind, dtype, device, layout="bhld"):
    q64 = torch.randn(B, H, LQ, D, device=device, dtype=torch.float64)
    k64 = torch.randn(B, H, LK, D, device=device, dtype=torch.float64)
    v64 = torch.randn(B, H, LK, D, device=device, dtype=torch.float64)
    do64 = torch.randn(B, H, LQ, D, device=device, dtype=torch.float64)
    kv_mask = _make_mask(mask_kind, B, LK, device)
    kw = dict(causal=causal, kv_mask=kv_mask)
    q, k, v, do = (t.to(dtype) for t in (q64, k64, v64, do64))
    if layout == "blhd":  # (B, L, H, D) storage seen through a transpose: non-contiguous inputs
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        assert not q.is_contiguous()
    if layout == "sliced":  # rows of D + 1 elements of which D are used: strides that are not multiples of 8
        q, k, v = (torch.cat([t, t[..., :1]], -1)[..., :D] for t in (q, k, v))
    got = _run(q, k, v, do, flash_attention, **kw)
    ref64 = _run(q.double(), k.double(), v.double(), do.double(), flash_attention_ref, **kw)
    ref_dt = _run(q, k, v, do, flash_attention_ref, **kw)
    for name, a, r64, rdt in zip(("out", "dq", "dk", "dv"), got, ref64, ref_dt):
        assert a.dtype == dtype
        assert_close_to_ref(a, r64, rdt, ATOL[dtype], name)
    if mask_kind == "empty":  # rows with no visible key: exact zeros, zero gradients
        assert (got[0][-1] == 0).all()
        assert (got[1][-1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_flash_attention_matches_reference(case, dtype, device):
    _check(*case, dtype, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", HEAD_DIM_CASES, ids=_ids)
def test_flash_attention_head_dims(case, dtype, device):
    _check(*case, dtype, device)


def test_head_dim_tiles(monkeypatch):
    import importlib

    fa = importlib.import_module("megacoca_kernels.flash_attention")
    tiles = {d: fa._head_dim_tiles(d) for d in (16, 24, 32, 40, 64, 72, 88, 96, 112, 128, 160, 256)}
    assert tiles == {16: (16, 0), 24: (32, 0), 32: (32, 0), 40: (32, 16), 64: (64, 0), 72: (64, 16), 88: (64, 32),
                     96: (64, 32), 112: (128, 0), 128: (128, 0), 160: (128, 32), 256: (256, 0)}
    monkeypatch.setattr(fa, "SPLIT_HEAD_DIM", False)
    assert fa._head_dim_tiles(88) == (128, 0)


def test_flash_attention_stride_align(device):
    """STRIDE_ALIGN = 8 (every stride a multiple of 8 elements, so D = 88 rows load 16 bytes at a time) and 1."""
    import importlib

    fa = importlib.import_module("megacoca_kernels.flash_attention")
    x = torch.randn(2, 5, 3, 88, device=device)
    assert fa._stride_align(x, x.transpose(1, 2)) == 8
    assert fa._stride_align(x, torch.cat([x, x[..., :1]], -1)[..., :88]) == 1
    assert fa._stride_align(torch.randn(2, 5, 3, 64, device=device)) == 1  # Triton specializes multiples of 16
    _check(2, 3, 33, 47, 88, True, "pad", torch.float32, device, layout="sliced")
    _check(1, 2, 40, 40, 40, False, "empty", torch.float16, device, layout="sliced")


def test_flash_attention_head_dim_padded(device, monkeypatch):
    """SPLIT_HEAD_DIM = False (one padded tile for 88, as bench.py's triton-pad-d runs it) stays correct."""
    import importlib

    monkeypatch.setattr(importlib.import_module("megacoca_kernels.flash_attention"), "SPLIT_HEAD_DIM", False)
    _check(*HEAD_DIM_CASES[4], torch.float32, device)


@pytest.mark.parametrize("case", [CASES[3], CASES[6], CASES[9], HEAD_DIM_CASES[4]], ids=_ids)
def test_flash_attention_bf16(case, device):
    # Under the interpreter bf16 tiles are upcast to fp32 right after loading (triton issue 11584); loads
    # and stores still go through bf16 memory. On a GPU this runs bf16 tensor-core dots.
    _check(*case, torch.bfloat16, device)


def test_flash_attention_non_contiguous_and_scale(device):
    _check(2, 2, 77, 77, 64, True, "pad", torch.float32, device, layout="blhd")
    _check(2, 3, 33, 47, 88, True, "pad", torch.float32, device, layout="blhd")  # the model's heads: stride_h 88
    q, k, v = (torch.randn(1, 2, 9, 32, device=device) for _ in range(3))
    out = flash_attention(q, k, v, softmax_scale=0.3)
    torch.testing.assert_close(out, flash_attention_ref(q, k, v, softmax_scale=0.3), atol=1e-5, rtol=1e-5)


def test_flash_attention_matches_sdpa(device):
    q = torch.randn(2, 3, 77, 64, device=device)
    k = torch.randn(2, 3, 77, 64, device=device)
    v = torch.randn(2, 3, 77, 64, device=device)
    for causal in (False, True):
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.testing.assert_close(flash_attention(q, k, v, causal=causal), expected, atol=1e-5, rtol=1e-5)


def test_flash_attention_under_activation_checkpointing(device):
    from torch.utils.checkpoint import checkpoint

    q, k, v = (torch.randn(2, 2, 33, 64, device=device, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 33, device=device) > 0.2

    def block(q, k, v):
        return flash_attention(q.tanh(), k, v, causal=True, kv_mask=mask).sin().sum()

    def grads(fn):
        for t in (q, k, v):
            t.grad = None
        fn().backward()  # reentrant checkpointing does not support autograd.grad
        return [t.grad.clone() for t in (q, k, v)]

    plain = grads(lambda: block(q, k, v))
    for reentrant in (False, True):
        ckpt = grads(lambda: checkpoint(block, q, k, v, use_reentrant=reentrant))
        for a, b in zip(plain, ckpt):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_flash_attention_rejects_bad_shapes(device):
    q = torch.randn(1, 2, 5, 64, device=device)
    with pytest.raises(ValueError):
        flash_attention(q, torch.randn(1, 2, 5, 32, device=device), torch.randn(1, 2, 5, 32, device=device))
    with pytest.raises(ValueError):
        flash_attention(q, q, q, kv_mask=torch.ones(1, 4, dtype=torch.bool, device=device))
    with pytest.raises(ValueError):
        flash_attention(torch.randn(1, 1, 5, 512, device=device), *(torch.randn(1, 1, 5, 512, device=device),) * 2)


@pytest.mark.parametrize("blocks", [(64, 32), (16, 64)], ids=["m64n32", "m16n64"])
def test_flash_attention_unequal_tiles(blocks, device, monkeypatch):
    """The interpreter runs 32x32 tiles; GPU autotuning picks BLOCK_M != BLOCK_N, where the causal loop bounds
    (first unmasked key block, first query block a key block can see) differ. Run those tilings here too."""
    import importlib

    import triton

    fa = importlib.import_module("megacoca_kernels.flash_attention")
    config = [triton.Config({"BLOCK_M": blocks[0], "BLOCK_N": blocks[1]}, num_warps=4, num_stages=1)]
    for kernel in (fa._flash_attention_fwd_kernel, fa._flash_attention_bwd_dkdv_kernel,
                   fa._flash_attention_bwd_dq_kernel):
        monkeypatch.setattr(kernel, "configs", config)
        monkeypatch.setattr(kernel, "cache", {})
    _check(2, 1, 77, 77, 64, True, "pad", torch.float32, device)
    _check(1, 2, 130, 45, 32, True, "empty", torch.float32, device)
    _check(1, 2, 45, 130, 88, False, "pad", torch.float32, device)  # head dim as two tiles (64 + 32)


@pytest.mark.parametrize("case", [CASES[3], CASES[7], CASES[9], CASES[11], HEAD_DIM_CASES[4], HEAD_DIM_CASES[6]],
                         ids=_ids)
def test_flash_attention_atomic_dq(case, device, monkeypatch):
    """The FlashAttention-2 style backward (dQ added with atomics inside the dK/dV kernel)."""
    import importlib

    monkeypatch.setattr(importlib.import_module("megacoca_kernels.flash_attention"), "DQ_ATOMIC", True)
    _check(*case, torch.float16, device)
