"""Small helpers shared by the kernel files: interpreter detection and launch-time dtype choices."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs through its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def upcast_tiles(dtype: torch.dtype) -> bool:
    """Whether kernels should upcast loaded tiles to fp32.

    The interpreter's bf16 arithmetic is wrong (triton issue 11584), so under it bf16 tiles are widened to
    fp32 right after loading; loads and stores still go through bf16 memory, so the bf16 path is exercised.
    On a GPU nothing is upcast: tensor cores take bf16 directly.
    """
    return dtype == torch.bfloat16 and interpreting()


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: exact fp32 for fp32 inputs (match torch's fp32 results), else the default."""
    return "ieee" if dtype == torch.float32 or upcast_tiles(dtype) else "tf32"


# Tests set this to fill every buffer a kernel is meant to write with NaN first, so an element the kernel
# forgets to write shows up as NaN instead of passing with whatever torch.empty happened to return.
DEBUG_FILL_NAN = False


def empty(shape, *, device, dtype) -> torch.Tensor:
    out = torch.empty(shape, device=device, dtype=dtype)
    if DEBUG_FILL_NAN and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def empty_like(t: torch.Tensor) -> torch.Tensor:
    return empty(t.shape, device=t.device, dtype=t.dtype)
