"""The kernels also compile for an H100 (sm_90) and an A100 (sm_80), checked without a GPU.

The interpreter runs kernels as numpy and never lowers them, so errors that only the compiler sees (a
loop-carried value changing type, a constexpr branch that does not type-check, a dot shape the hardware
cannot take) would pass every other test here. This compiles the bf16 hot paths, attention with a head dim of
128 (one tile) and of 88 (two tiles, 64 + 32), with Triton's bundled ptxas in a fresh process (the test process
has its kernels defined as interpreted).
"""

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("arch", [90, 80], ids=["sm90", "sm80"])
def test_kernels_compile(arch):
    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-m", "megacoca_kernels.compile_check", "--arch", str(arch)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok ") >= 21, result.stdout
    for flags in ("causal=True kv_mask=True", "causal=False kv_mask=False"):  # D 88's two tiles, every kernel
        for kernel in ("fwd", "dkdv", "dq"):
            assert f"ok    attention {kernel} bf16 D88 (64+32) {flags}" in result.stdout, result.stdout


def test_cpu_tensor_with_compiled_kernels_is_a_clear_error():
    code = ("import torch\nfrom megacoca_kernels import layer_norm\n"
            "layer_norm(torch.randn(2, 8), None, None)\n")
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "TRITON_INTERPRET=1" in result.stderr.strip().splitlines()[-1], result.stderr


def test_one_tile_config_per_kernel_when_tuning_is_off(monkeypatch):
    """MEGACOCA_KERNELS_TUNE=0 (the GPU check's compiled correctness run): one config per kernel, a tile the compile
    check compiles for the widest head dims; the autotuned lists otherwise (decided off the interpreter)."""
    from megacoca_kernels import flash_attention_kernels as kernels

    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    assert len(kernels._configs("fwd")) == len(kernels._configs("bwd")) == 8
    monkeypatch.setenv("MEGACOCA_KERNELS_TUNE", "0")
    (fwd,), (bwd,) = kernels._configs("fwd"), kernels._configs("bwd")
    assert (fwd.kwargs, bwd.kwargs) == ({"BLOCK_M": 64, "BLOCK_N": 32}, {"BLOCK_M": 32, "BLOCK_N": 64})
