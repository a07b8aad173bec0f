"""Error bounds shared by the kernel tests (a plain module: `conftest` names can clash across test dirs)."""

import torch


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
