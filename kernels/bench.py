"""Benchmarks for megacoca_kernels on CoCa's shapes (needs a CUDA GPU; not run in CI).

    python -m megacoca_kernels.bench                    # everything, bf16, prints a table, writes CSV
    python -m megacoca_kernels.bench --only attention --csv attn.csv
    TRITON_INTERPRET=1 python -m megacoca_kernels.bench --smoke   # tiny CPU shapes: checks the script

What it measures, each against torch:
- attention: forward, backward and forward+backward TFLOP/s and the fwd+bwd peak memory, for the Triton
  kernel (its default split dQ backward, and the atomic-dQ backward; for a head dim that is not a power of two,
  also padded to one power-of-two tile, `triton-pad-d`, against its default two tiles), torch SDPA restricted
  to its flash backend, and the eager reference (`flash_attention_ref`); on ViT self-attention (L = 257, 577; D = 64,
  88), causal text self-attention (L = 77) and the decoder's cross-attention (Lq = 77, Lk = 256). FLOPs: fwd
  4*B*H*Lq*Lk*D (halved when causal), bwd 2.5x fwd.
- linear cross-entropy: forward+backward time and peak memory at V = 64k and 32k tokens (reduction "sum",
  as the model uses), against torch with bf16 logits and with fp32 logits (megacoca's torch path).
- LayerNorm: forward and backward GB/s against torch and against a measured device copy (y.copy_(x)).

Goals (H100): attention fwd+bwd >= SDPA-flash; linear CE peak <= 1/4 of torch's at <= 1.2x its time;
LayerNorm >= 80% of copy bandwidth. The summary lines say PASS/FAIL for each.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from .flash_attention import flash_attention, flash_attention_ref
from .layer_norm import layer_norm
from .linear_cross_entropy import linear_cross_entropy

# The module, for its DQ_ATOMIC and SPLIT_HEAD_DIM switches (the package's `flash_attention` attribute is the op,
# a function).
fa = importlib.import_module(".flash_attention", __package__)

# (name, B, H, Lq, Lk, D, causal)
ATTENTION_CASES = [
    ("vit-257-d64", 64, 16, 257, 257, 64, False),
    ("vit-577-d64", 32, 16, 577, 577, 64, False),
    ("vit-257-d88", 64, 16, 257, 257, 88, False),
    ("vit-577-d88", 32, 16, 577, 577, 88, False),
    ("text-causal-77", 256, 12, 77, 77, 64, True),
    ("cross-77x256", 256, 12, 77, 256, 64, False),
]
SMOKE_ATTENTION_CASES = [("smoke-self", 1, 2, 33, 33, 88, False), ("smoke-causal", 1, 2, 17, 17, 64, True)]


@dataclass
class Row:
    bench: str
    case: str
    provider: str
    metric: str
    value: float
    unit: str


class Timer:
    """CUDA: triton.testing.do_bench (median ms); smoke mode: wall clock of a couple of runs."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def ms(self, fn, grad_to_none=None) -> float:
        if self.cuda:
            return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    def peak_mib(self, fn) -> float:
        """Peak memory allocated by fn above what was allocated before it (MiB); NaN without CUDA."""
        if not self.cuda:
            fn()
            return float("nan")
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20


def _sdpa_flash(q, k, v, causal):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


def bench_attention(timer: Timer, device, dtype, cases) -> list[Row]:
    def triton_with(dq_atomic, split_head_dim):
        def run(q, k, v, c):
            # Read when the kernels launch (the backward's too), which happens inside this provider's timing.
            fa.DQ_ATOMIC, fa.SPLIT_HEAD_DIM = dq_atomic, split_head_dim
            return flash_attention(q, k, v, causal=c)

        return run

    providers = {
        "triton": triton_with(False, True),
        "triton-atomic-dq": triton_with(True, True),
        "triton-pad-d": triton_with(False, False),
        "sdpa-flash": _sdpa_flash,
        "eager": lambda q, k, v, c: flash_attention_ref(q, k, v, causal=c),
    }
    if not timer.cuda:
        providers.pop("sdpa-flash")  # the flash backend is CUDA-only
    rows = []
    for name, B, H, LQ, LK, D, causal in cases:
        q = torch.randn(B, H, LQ, D, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(B, H, LK, D, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(B, H, LK, D, device=device, dtype=dtype, requires_grad=True)
        do = torch.randn(B, H, LQ, D, device=device, dtype=dtype)
        fwd_flops = 4 * B * H * LQ * LK * D
        if causal:  # top-left causal: row i sees min(i + 1, Lk) keys
            fwd_flops = fwd_flops * sum(min(i + 1, LK) for i in range(LQ)) / (LQ * LK)
        for provider, fn in providers.items():
            if provider == "triton-pad-d" and D & (D - 1) == 0:
                continue  # a power-of-two head dim is one tile either way
            try:
                out = fn(q, k, v, causal)
            except RuntimeError as err:  # e.g. a head dim the SDPA flash backend refuses
                print(f"  {name} {provider}: skipped ({str(err).splitlines()[0][:80]})")
                continue
            fwd = timer.ms(lambda: fn(q, k, v, causal))
            bwd = timer.ms(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True))
            del out

            def fwd_bwd():
                torch.autograd.grad(fn(q, k, v, causal), (q, k, v), do)

            both = timer.ms(fwd_bwd)
            peak = timer.peak_mib(fwd_bwd)
            for metric, ms, flops in (("fwd", fwd, fwd_flops), ("bwd", bwd, 2.5 * fwd_flops),
                                      ("fwd+bwd", both, 3.5 * fwd_flops)):
                rows.append(Row("attention", name, provider, f"{metric} TFLOP/s", flops / ms * 1e-9, "TFLOP/s"))
                rows.append(Row("attention", name, provider, f"{metric} ms", ms, "ms"))
            rows.append(Row("attention", name, provider, "fwd+bwd peak", peak, "MiB"))
    return rows


def bench_linear_cross_entropy(timer: Timer, device, dtype, tokens, hidden, vocab) -> list[Row]:
    h = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=device, dtype=dtype) / math.sqrt(hidden)).requires_grad_()
    target = torch.randint(0, vocab, (tokens,), device=device)
    target[::7] = -100  # some padding, as in captions
    F = torch.nn.functional
    providers = {
        "triton": lambda: linear_cross_entropy(h, w, target, reduction="sum"),
        "torch": lambda: F.cross_entropy(F.linear(h, w), target, reduction="sum"),
        "torch-fp32-logits": lambda: F.cross_entropy(F.linear(h, w).float(), target, reduction="sum"),
    }
    case = f"N{tokens}-H{hidden}-V{vocab}"
    rows = []
    for provider, fn in providers.items():
        def step():
            fn().backward()

        ms = timer.ms(step, grad_to_none=[h, w])
        h.grad = w.grad = None
        peak = timer.peak_mib(step)
        h.grad = w.grad = None
        rows.append(Row("linear_cross_entropy", case, provider, "fwd+bwd ms", ms, "ms"))
        rows.append(Row("linear_cross_entropy", case, provider, "fwd+bwd peak", peak, "MiB"))
    return rows


def bench_layer_norm(timer: Timer, device, dtype, shapes) -> list[Row]:
    rows = []
    for M, N in shapes:
        x = torch.randn(M, N, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(N, device=device, dtype=dtype, requires_grad=True)
        b = torch.randn(N, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(M, N, device=device, dtype=dtype)
        nbytes = M * N * x.element_size()
        case = f"{M}x{N}"
        y = torch.empty_like(x)
        copy_ms = timer.ms(lambda: y.copy_(x))
        rows.append(Row("layer_norm", case, "copy", "fwd GB/s", 2 * nbytes / copy_ms * 1e-6, "GB/s"))
        providers = {
            "triton": lambda: layer_norm(x, w, b, 1e-5),
            "torch": lambda: torch.nn.functional.layer_norm(x, (N,), w, b, 1e-5),
        }
        for provider, fn in providers.items():
            fwd = timer.ms(fn)
            out = fn()
            bwd = timer.ms(lambda: torch.autograd.grad(out, (x, w, b), dy, retain_graph=True))
            rows.append(Row("layer_norm", case, provider, "fwd GB/s", 2 * nbytes / fwd * 1e-6, "GB/s"))
            rows.append(Row("layer_norm", case, provider, "bwd GB/s", 3 * nbytes / bwd * 1e-6, "GB/s"))
    return rows


def _value(rows, bench, case, provider, metric):
    for r in rows:
        if (r.bench, r.case, r.provider, r.metric) == (bench, case, provider, metric):
            return r.value
    return None


def summarize(rows) -> list[str]:
    lines = []

    def verdict(ok):
        return "n/a " if ok is None else ("PASS" if ok else "FAIL")

    for case in sorted({r.case for r in rows if r.bench == "attention"}):
        sdpa = _value(rows, "attention", case, "sdpa-flash", "fwd+bwd TFLOP/s")
        for provider in ("triton", "triton-atomic-dq"):
            ours = _value(rows, "attention", case, provider, "fwd+bwd TFLOP/s")
            ok = None if ours is None or sdpa is None else ours >= sdpa
            lines.append(f"{verdict(ok)} attention {case} {provider}: fwd+bwd {ours or float('nan'):.1f} vs "
                         f"SDPA-flash {sdpa or float('nan'):.1f} TFLOP/s (goal >= 1.0x)")
        padded = _value(rows, "attention", case, "triton-pad-d", "fwd+bwd TFLOP/s")
        if padded is not None:
            ours = _value(rows, "attention", case, "triton", "fwd+bwd TFLOP/s")
            lines.append(f"{verdict(None if ours is None else ours >= padded)} attention {case} head dim as two "
                         f"tiles: fwd+bwd {ours or float('nan'):.1f} vs {padded:.1f} TFLOP/s padded to one tile "
                         "(goal >= 1.0x)")
    for case in sorted({r.case for r in rows if r.bench == "linear_cross_entropy"}):
        t_ours = _value(rows, "linear_cross_entropy", case, "triton", "fwd+bwd ms")
        m_ours = _value(rows, "linear_cross_entropy", case, "triton", "fwd+bwd peak")
        t_torch = min(_value(rows, "linear_cross_entropy", case, p, "fwd+bwd ms") for p in ("torch", "torch-fp32-logits"))
        m_torch = min(_value(rows, "linear_cross_entropy", case, p, "fwd+bwd peak") for p in ("torch", "torch-fp32-logits"))
        ok = None if math.isnan(m_ours) else (m_ours <= m_torch / 4 and t_ours <= 1.2 * t_torch)
        lines.append(f"{verdict(ok)} linear_cross_entropy {case}: peak {m_ours:.0f} vs {m_torch:.0f} MiB "
                     f"(goal <= 0.25x), time {t_ours:.2f} vs {t_torch:.2f} ms (goal <= 1.2x), vs the best torch")
    for case in sorted({r.case for r in rows if r.bench == "layer_norm"}):
        copy = _value(rows, "layer_norm", case, "copy", "fwd GB/s")
        for metric in ("fwd GB/s", "bwd GB/s"):
            ours = _value(rows, "layer_norm", case, "triton", metric)
            lines.append(f"{verdict(ours >= 0.8 * copy)} layer_norm {case} {metric.split()[0]}: {ours:.0f} GB/s = "
                         f"{100 * ours / copy:.0f}% of copy {copy:.0f} GB/s (goal >= 80%)")
    return lines


def print_table(rows) -> None:
    header = f"{'bench':<22}{'case':<22}{'provider':<19}{'metric':<18}{'value':>12}  unit"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.bench:<22}{r.case:<22}{r.provider:<19}{r.metric:<18}{r.value:>12.3f}  {r.unit}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["attention", "linear_cross_entropy", "layer_norm"], action="append")
    parser.add_argument("--csv", default="megacoca_kernels_bench.csv", help="where to write the rows")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--tokens", type=int, default=32768, help="linear CE tokens")
    parser.add_argument("--hidden", type=int, default=1024, help="linear CE hidden size")
    parser.add_argument("--vocab", type=int, default=65536, help="linear CE vocabulary")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on CPU through TRITON_INTERPRET, to check this script without a GPU")
    args = parser.parse_args(argv)

    if args.smoke:
        # `python -m megacoca_kernels.bench` imports the kernels before this line runs, so the variable has to
        # come from the environment.
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            sys.exit("bench.py --smoke runs the kernels on CPU: set TRITON_INTERPRET=1 in the environment")
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            sys.exit("bench.py needs a CUDA GPU (none found); use --smoke to check the script on CPU")
        device = torch.device("cuda")
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    timer = Timer(cuda=device.type == "cuda")
    only = set(args.only or ["attention", "linear_cross_entropy", "layer_norm"])

    rows: list[Row] = []
    if "attention" in only:
        rows += bench_attention(timer, device, dtype, SMOKE_ATTENTION_CASES if args.smoke else ATTENTION_CASES)
    if "linear_cross_entropy" in only:
        if args.smoke:
            rows += bench_linear_cross_entropy(timer, device, dtype, 37, 32, 1000)
        else:
            rows += bench_linear_cross_entropy(timer, device, dtype, args.tokens, args.hidden, args.vocab)
    if "layer_norm" in only:
        shapes = [(37, 88)] if args.smoke else [(65536, 1024), (32768, 1408), (16384, 4096)]
        rows += bench_layer_norm(timer, device, dtype, shapes)

    device_name = torch.cuda.get_device_name() if timer.cuda else "cpu (TRITON_INTERPRET, smoke)"
    print(f"device: {device_name}; dtype: {dtype}; torch {torch.__version__}")
    print_table(rows)
    print()
    for line in summarize(rows):
        print(line)
    with open(args.csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["device", "dtype", "bench", "case", "provider", "metric", "value", "unit"])
        for r in rows:
            writer.writerow([device_name, str(dtype).split(".")[-1], r.bench, r.case, r.provider, r.metric,
                             f"{r.value:.6g}", r.unit])
    print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
