"""layer_norm forward and backward (dx, dweight, dbias) against torch, through Triton's interpreter.

Errors are bounded by twice torch's own same-dtype error (vs fp64) plus atol; outputs are NaN-filled first.
"""

import pytest
import torch
from kernel_asserts import assert_close_to_ref

from megacoca_kernels import layer_norm, layer_norm_ref

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _run(x, w, b, dy, fn):
    x, w, b = (t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b))
    y = fn(x, w, b, 1e-5)
    inputs = [t for t in (x, w, b) if t is not None]
    return (y, *torch.autograd.grad(y, inputs, dy))


# Odd widths (88 = giant head dim, 1408 = giant width), several leading dims, rows that do not split evenly
# over the backward programs.
SHAPES = [(1, 32), (3, 7, 88), (5, 1408), (2, 77, 100)]
CASES = [(shape, dtype, "weight+bias") for shape in SHAPES for dtype in DTYPES] + [
    ((3, 7, 88), torch.float32, "weight"),
    ((3, 7, 88), torch.float16, "none"),
]


def _id(case):
    shape, dtype, affine = case
    return f"{'x'.join(map(str, shape))}-{str(dtype).split('.')[-1]}-{affine}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_layer_norm_matches_torch(case, device):
    shape, dtype, affine = case
    N = shape[-1]
    x64 = torch.randn(shape, device=device, dtype=torch.float64) * 3 + 1
    w64 = torch.randn(N, device=device, dtype=torch.float64) if affine != "none" else None
    b64 = torch.randn(N, device=device, dtype=torch.float64) if affine == "weight+bias" else None
    dy64 = torch.randn(shape, device=device, dtype=torch.float64)
    cast = lambda t: t.to(dtype) if t is not None else None  # noqa: E731
    x, w, b, dy = map(cast, (x64, w64, b64, dy64))
    got = _run(x, w, b, dy, layer_norm)
    ref64 = _run(*(t.double() if t is not None else None for t in (x, w, b, dy)), layer_norm_ref)
    ref_dt = _run(x, w, b, dy, layer_norm_ref)
    names = ["y", "dx", "dw", "db"][: len(got)]
    for name, a, r64, rdt in zip(names, got, ref64, ref_dt):
        assert a.dtype == dtype
        # dweight/dbias sum over rows: scale atol with the row count.
        atol = ATOL[dtype] * (1 if name in ("y", "dx") else max(1, x.numel() // N) ** 0.5)
        assert_close_to_ref(a, r64, rdt, atol, name)


def test_layer_norm_non_contiguous_input(device):
    x = torch.randn(64, 6, device=device).t()  # (6, 64), last stride 6
    w, b = torch.randn(64, device=device), torch.randn(64, device=device)
    torch.testing.assert_close(layer_norm(x, w, b), layer_norm_ref(x, w, b), atol=1e-5, rtol=1e-5)


def test_layer_norm_rejects_bad_weight(device):
    with pytest.raises(ValueError):
        layer_norm(torch.randn(2, 8, device=device), torch.ones(4, device=device), None)
