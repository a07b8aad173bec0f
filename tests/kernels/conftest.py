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
