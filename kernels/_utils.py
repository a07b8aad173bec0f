"""Small helpers shared by the kernel files: interpreter detection and launch-time dtype choices."""

from __future__ import annotations

import os

import torch


# Triton picks interpreted or compiled when a kernel is defined, i.e. when this package is imported; capture the
# choice once so that the launchers agree with the kernels even if the variable changes later.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """True when the kernels were defined under Triton's CPU interpreter (`TRITON_INTERPRET=1` at import)."""
    return _INTERPRET


def check_device(t: torch.Tensor, op: str) -> None:
    """A clear error instead of Triton's "0 active drivers" when a CPU tensor meets compiled kernels."""
    if t.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(
            f"megacoca_kernels.{op}: got a {t.device.type} tensor; the kernels run on CUDA, or on CPU through "
            "Triton's interpreter when TRITON_INTERPRET=1 is set before megacoca_kernels is imported "
            "(or use kernels='torch')"
        )


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
