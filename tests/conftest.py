"""Suite-wide test settings, applied before any test module is imported.

CPU runs use Triton's interpreter. `triton.jit` chooses interpreted or compiled when each kernel is defined,
so the choice must be made before anything (a model test, DeepSpeed) imports megacoca_kernels: here, at the
root of the suite. On a CUDA machine, `TRITON_INTERPRET=0 pytest` runs the kernels compiled.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread is faster, and immune to oversubscription on a busy CI machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
