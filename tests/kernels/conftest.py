"""Kernel tests run on CPU through Triton's interpreter.

TRITON_INTERPRET must be set before the kernel modules are imported: `triton.jit` picks interpreted or
compiled when each kernel is defined. On a CUDA machine, `TRITON_INTERPRET=0 pytest tests/kernels` runs the
same tests compiled on the GPU (bf16 arithmetic included).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def _interpreting() -> bool:
    return os.environ["TRITON_INTERPRET"] not in ("", "0")


@pytest.fixture
def device() -> str:
    if _interpreting():
        return "cpu"
    if not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET=0 needs a CUDA device")
    return "cuda"


@pytest.fixture(autouse=True)
def _seed_and_nan_fill(monkeypatch):
    """Seed every test, and make the ops fill their output buffers with NaN before launching kernels."""
    from megacoca_kernels import _utils

    torch.manual_seed(0)
    monkeypatch.setattr(_utils, "DEBUG_FILL_NAN", True)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_ref(out, ref64, ref_same_dtype, atol, name=""):
    """The kernel's error vs an fp64 reference is bounded by twice torch's own same-dtype error plus atol.

    atol is relative to the output's scale (max |ref|, at least 1): one rounding of a value of size 8 in bf16
    is 8x one of size 1.
    """
    assert out.shape == ref64.shape, (name, out.shape, ref64.shape)
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten NaN-filled element?)"
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    bound = 2 * max_err(ref_same_dtype, ref64) + atol * scale
    err = max_err(out, ref64)
    assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g}"
