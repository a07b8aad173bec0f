"""Compile every kernel for a CUDA target without a GPU: catches the type and lowering errors that Triton's
interpreter cannot (loop-carried types, constexpr branches, dot shapes, shared-memory size).

    TRITON_INTERPRET=0 python -m megacoca_kernels.compile_check            # quick set (bf16, head dims 128 and 88)
    TRITON_INTERPRET=0 python -m megacoca_kernels.compile_check --full     # every dtype and head dim
    ... --arch 80                                                           # A100 instead of H100

Uses the ptxas that ships with Triton; it needs no driver. Prints one line per kernel variant and exits 1
if any fails.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# The modules by name: the package's `layer_norm` and `linear_cross_entropy` attributes are the ops (functions).
fa = importlib.import_module(".flash_attention_kernels", __package__)
fa_launch = importlib.import_module(".flash_attention", __package__)
ln = importlib.import_module(".layer_norm", __package__)
lce = importlib.import_module(".linear_cross_entropy", __package__)


def _jit_fn(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def _compile(kernel, arg_type, constexprs, target, num_warps, num_stages):
    fn = _jit_fn(kernel)
    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else arg_type(n) for n in names}
    src = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})


def _attention_types(dtype):
    def arg_type(name):
        if name in ("Q", "K", "V", "OUT", "DO", "DK", "DV", "DQ"):
            return "*" + dtype
        if name in ("LSE", "DELTA", "DQ_ACC"):
            return "*fp32"
        if name == "KV_MASK":
            return "*u8"
        if name in ("qk_scale", "softmax_scale"):
            return "fp32"
        return "i32"

    return arg_type


def variants(full: bool):
    dtypes = [("bf16", "tf32"), ("fp16", "tf32"), ("fp32", "ieee")] if full else [("bf16", "tf32")]
    # Head dims and their tiles (flash_attention._head_dim_tiles): one power-of-two tile, or two for a head dim
    # that is not one (CoCa giant's 88 as 64 + 32, 72 as 64 + 16, 40 as 32 + 16; 112 as one padded tile of 128).
    head_dims = [32, 64, 128, 256, 88, 72, 40, 112] if full else [128, 88]
    flags = [(False, False), (True, True), (False, True)] if full else [(True, True), (False, False)]
    for dtype, precision in dtypes:
        for head_dim in head_dims:
            block_d, block_d2 = fa_launch._head_dim_tiles(head_dim)
            width = block_d + block_d2
            # STRIDE_ALIGN as the launcher picks it for (B, H, L, D) or (B, L, H, D) storage; --full also compiles
            # a head dim that is not a multiple of 16 with strides that are not multiples of 8.
            aligns = [1] if head_dim % 16 == 0 else [8, 1] if full else [8]
            for (causal, mask), align in itertools.product(flags, aligns):
                common = dict(CAUSAL=causal, HAS_KV_MASK=mask, UPCAST=False, DOT_PRECISION=precision, D=head_dim,
                              STRIDE_ALIGN=align, BLOCK_D=block_d, BLOCK_D2=block_d2)
                tiles = f" ({block_d}+{block_d2})" if block_d2 else ""
                odd = " strides not multiples of 8" if head_dim % 16 and align == 1 else ""
                tag = f"{dtype} D{head_dim}{tiles} causal={causal} kv_mask={mask}{odd}"
                fwd_tile = dict(BLOCK_M=128, BLOCK_N=64) if width <= 128 else dict(BLOCK_M=64, BLOCK_N=32)
                bwd_tile = dict(BLOCK_M=64, BLOCK_N=64) if width <= 128 else dict(BLOCK_M=32, BLOCK_N=64)
                yield (f"attention fwd {tag}", fa._flash_attention_fwd_kernel, _attention_types(dtype),
                       {**common, **fwd_tile}, 8, 3 if width <= 128 else 2)
                for atomic in (False, True):
                    yield (f"attention dkdv {tag} dq_atomic={atomic}", fa._flash_attention_bwd_dkdv_kernel,
                           _attention_types(dtype), {**common, **bwd_tile, "DQ_ATOMIC": atomic}, 4, 2)
                yield (f"attention dq {tag}", fa._flash_attention_bwd_dq_kernel, _attention_types(dtype),
                       {**common, **bwd_tile}, 4, 2)
    yield ("attention bwd preprocess", fa._flash_attention_bwd_preprocess_kernel, _attention_types("bf16"),
           dict(D=88, STRIDE_ALIGN=8, BLOCK_M=64, BLOCK_D=128), 4, 2)

    def ln_type(name):
        if name in ("X", "Y", "W", "B", "DY", "DX"):
            return "*bf16"
        if name in ("MEAN", "RSTD", "DW_PARTIAL", "DB_PARTIAL"):
            return "*fp32"
        return "fp32" if name == "eps" else "i32"

    for affine in ([True, False] if full else [True]):
        c = dict(HAS_WEIGHT=affine, HAS_BIAS=affine, BLOCK_N=2048)
        yield (f"layer_norm fwd affine={affine}", ln._layer_norm_fwd_kernel, ln_type, {**c, "BLOCK_M": 2}, 8, 2)
        yield (f"layer_norm bwd affine={affine}", ln._layer_norm_bwd_kernel, ln_type, c, 8, 2)

    def lce_type(name):
        if name == "LOGITS":
            return "*bf16"
        if name == "TARGET":
            return "*i64"
        return "*fp32" if name in ("LSE", "TARGET_LOGIT", "SCALE") else "i32"

    yield ("linear_cross_entropy fwd (lse, target logit)", lce._linear_cross_entropy_fwd_kernel, lce_type,
           dict(BLOCK_V=4096), 8, 2)
    yield ("linear_cross_entropy bwd (grad in place)", lce._linear_cross_entropy_bwd_kernel, lce_type,
           dict(BLOCK_V=4096), 8, 2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="compile megacoca_kernels for a CUDA target, no GPU needed")
    parser.add_argument("--full", action="store_true", help="every dtype, head dim and mask combination")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100, 80 = A100)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("compile_check needs compiled kernels: run it with TRITON_INTERPRET=0")
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for label, kernel, arg_type, constexprs, num_warps, num_stages in variants(args.full):
        start = time.time()
        try:
            compiled = _compile(kernel, arg_type, constexprs, target, num_warps, num_stages)
            print(f"ok    {label}  ({time.time() - start:.1f}s, shared memory {compiled.metadata.shared} B)")
        except Exception as err:  # noqa: BLE001 - report every variant, then fail
            failures += 1
            print(f"FAIL  {label}: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
