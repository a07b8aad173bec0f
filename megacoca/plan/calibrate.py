"""`megacoca plan --calibrate`: measure this machine's DeviceProfile (issue 11, "Calibration").

`calibrate(ranks)` forks `ranks` processes (2 when ranks == 1, for the collectives; from a forkserver that
imported torch, and on a CPU DeepSpeed, once; FileStore rendezvous, no ports), each a CPU rank with `threads`
threads (gloo) or one GPU (nccl), and measures what the planner's time model (megacoca.plan.timing) divides by,
every rank at the same time, so that the figures describe one rank among `ranks` co-located ones (on a CPU they
share its cores).
Both precisions are measured (fp32 and bf16, and fp16 when asked for), so that one profile plans fp32 and bf16
layouts:

- matmul_flops[precision]: 2 m k n / seconds of the pair (T x W) @ (W x 4W), (T x 4W) @ (4W x W), the MLP of a
  transformer block, T tokens, W over a sweep; the median over W of each W's median over repetitions (after two
  warm-up calls), averaged over the ranks.
- memory_bw: (read + written bytes) / seconds of copying one large tensor into another.
- block_rates[precision], block_overhead_s[precision]: forward + backward of a SelfAttentionBlock (module and inputs
  in that precision: bf16 on a CPU pays casts and non-GEMM kernels fp32 does not) at three widths and a few batch
  sizes, fitted as time = overhead + FLOPs / a matmul rate + elementwise elements / an elementwise rate +
  attention-score elements / an attention rate (the quantities of megacoca.plan.timing.Work; FLOPs as
  megacoca.metrics.flops counts them), coefficients >= 0, relative residuals. One rate is not enough: on a CPU in
  bf16 a W 256 block runs at 5x the FLOP/s of a W 64 one, because the work between the matmuls grows as W and the
  matmuls as W^2, and tensor parallelism splits the matmuls but not the LayerNorms and residuals.
- tensor_overhead_s[stage], step_overhead_s[stage] for ZeRO stages 0-3: real DeepSpeed engines on all the ranks
  (ds_configs zero0_fp32, zero1/2/3_bf16 as megacoca trains with them; ZeRO-3 with
  stage3_param_persistence_threshold 0, so that every tensor is partitioned) of a toy model of many small tensors
  and negligible FLOPs (K blocks of Linear(W, W) + LayerNorm(W), 4 tensors each, at two or more K), trained as
  megacoca's trainer does (engine(x), engine.backward, engine.step after every micro-batch, `accum` micro-batches
  per step). Per micro-batch (one that is not the last of its step) forward + backward + step, fitted as
  a + tensors x slope: tensor_overhead = slope - the same slope of plain torch forward + backward of the same
  model in the same precision (>= 0), what DeepSpeed adds per parameter tensor (ZeRO-1/2 gradient hooks and
  bucket copies, ZeRO-3's per-module gather and release and its collectives). Per step, the boundary's
  engine.step plus the last micro-batch's excess over the others (the gradient reduction happens there), fitted
  as b + tensors x c: step_overhead = b + TYPICAL_TENSORS x c (a small CoCa's tensor count) less its
  per-parameter part: flat-buffer bookkeeping, the overflow check, the collectives' latencies. Each figure is
  the slowest rank's median.
- micro_param_s[stage], step_param_s[stage]: the same toy at the smallest K and a large W (as many tensors, many
  more parameters): its excess over the narrow toy, beyond plain torch's and beyond the data-parallel collectives
  the time model counts itself (megacoca.plan.timing.dp_comm), per parameter per micro-batch (gradient
  accumulation and bucket copies) and per parameter of the optimizer partition per step (Adam, the precision
  casts, the gradient norm: on a CPU rank compute-bound, far slower than memory_bw would say).
- overlap: 0 on CPU ranks (a gloo collective takes the cores the compute needs); a GPU profile keeps the presets'
  assumption.
- intra_node_bw, collective_latency_s: all-reduce of 4 KB .. 64 MB, fitted as a ring,
  time = latency + 2 (n-1)/n bytes / bus bandwidth, minimising relative residuals (so that the small sizes fix
  the latency and the large ones the bandwidth). With ranks == 1 there is no collective to run: a CPU
  profile measures the collectives and the engines over 2 processes after the compute (the second idles until
  then), a GPU profile over 2 GPUs if there are 2, else it takes the link figures of the GPU's preset and runs the
  engines on one GPU; `source` says which.
- inter_node_bw: one host cannot measure it: equal to intra_node_bw, and `source` says so.
- peak_flops: the datasheet figure of a known GPU (megacoca.metrics.peak); a CPU has none, so the measured
  matmul rate (MFU against it is then a fraction of the achieved GEMM rate).
- memory_bytes: GPU memory, or host RAM / ranks. gpus_per_node: ranks on a CPU, the GPU count on CUDA.

`quick=True` shrinks every size and repetition count so that the whole run takes seconds (tests).
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass

from megacoca.plan.profile import PRESETS, DeviceProfile

DTYPES = ("fp32", "bf16", "fp16")
ALWAYS = ("fp32", "bf16")  # measured by every calibration, whatever precision it is asked for
# the forkserver imports these once (a rank's fork then starts in well under a second)
PRELOAD = ["torch", "torch.distributed", "megacoca.models.coca.layers"]
# and on a CPU DeepSpeed too (its optimizer check imports its Muon optimizer, whose module calls torch.compile at
# import: inductor, seconds on a small CPU). Not with GPUs: importing DeepSpeed picks its accelerator with
# torch.cuda.is_available(), which initialises the CUDA driver, and a process forked after that cannot use CUDA
PRELOAD_CPU = [*PRELOAD, "torch._dynamo", "deepspeed", "deepspeed.runtime.zero.muon.muon_optimizer",
               "deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.zero.stage3"]
# the DeepSpeed config megacoca trains each ZeRO stage with (ds_configs/), and its precision
ENGINE_CONFIGS = {0: ("zero0_fp32", "fp32"), 1: ("zero1_bf16", "bf16"), 2: ("zero2_bf16", "bf16"),
                  3: ("zero3_bf16", "bf16")}
TYPICAL_TENSORS = 120  # parameter tensors of a small CoCa on one rank: where the step fit is read off
_TENSORS_PER_BLOCK = 4  # the toy's Linear(W, W) + LayerNorm(W): weight, bias, weight, bias


@dataclass(frozen=True)
class Sizes:
    """What one calibration runs: shapes, repetitions, the minimum seconds of one timed repetition."""

    widths: tuple[int, ...]  # W of the matmul sweep
    tokens: int  # T of the matmul sweep
    reps: int
    min_rep_s: float  # a timed repetition repeats its call until it lasts this long (short calls on a GPU)
    copy_bytes: int
    block_widths: tuple[int, ...]  # W of the transformer blocks timed (heads and tokens fixed)
    attention_shapes: tuple[tuple[int, int], ...]  # (queries, keys) of the fused attention calls timed
    attention_batch: int
    attention_head_dim: int
    block_heads: int
    block_seq: int
    block_batches: tuple[int, ...]
    engine_width: int  # W of the toy model the DeepSpeed engines train
    engine_blocks: tuple[int, ...]  # its sizes K (blocks of 4 tensors)
    engine_heavy_width: int  # W of the same toy at the smallest K with many parameters: the per-parameter costs
    engine_micro_batch: int
    engine_accum: int  # micro-batches per step
    engine_warmup_steps: int
    engine_steps: int  # timed steps
    allreduce_bytes: tuple[int, ...]
    allreduce_reps: int  # more than `reps`: a small collective is cheap and its time noisy on a busy machine


def sizes_for(device: str, quick: bool) -> Sizes:
    kb, mb = 1 << 10, 1 << 20
    engine = dict(engine_width=32, engine_micro_batch=4, engine_heavy_width=512 if device == "cpu" else 4096)
    if quick:
        engine.update(engine_blocks=(8, 32), engine_accum=2, engine_warmup_steps=2, engine_steps=4)
    else:
        engine.update(engine_blocks=(8, 16, 32, 48), engine_accum=4, engine_warmup_steps=2, engine_steps=12)
    if device == "cpu":
        if quick:
            return Sizes(widths=(128, 256), tokens=1024, reps=3, min_rep_s=0.01, copy_bytes=64 * mb,
                         block_widths=(64, 128, 256), block_heads=4, block_seq=64, block_batches=(2, 4, 8),
                         attention_shapes=((32, 64), (64, 64), (64, 128)), attention_batch=4, attention_head_dim=32,
                         allreduce_bytes=tuple(4 * kb * 4 ** i for i in range(6)),  # 4 KB .. 4 MB
                         allreduce_reps=7, **engine)
        # blocks around coca_tiny's ViT block (W 128, 4 heads, 64 image tokens) at micro-batches up to 32
        return Sizes(widths=(128, 256, 512, 1024), tokens=2048, reps=5, min_rep_s=0.05, copy_bytes=256 * mb,
                     block_widths=(64, 128, 256), block_heads=4, block_seq=64, block_batches=(4, 8, 16, 32),
                     attention_shapes=((16, 64), (32, 64), (64, 64), (64, 128), (128, 128), (64, 256)),
                     attention_batch=8, attention_head_dim=32,
                     allreduce_bytes=tuple(4 * kb * 4 ** i for i in range(8)),  # 4 KB .. 64 MB
                     allreduce_reps=9, **engine)
    if quick:
        return Sizes(widths=(1024, 4096), tokens=2048, reps=3, min_rep_s=0.01, copy_bytes=256 * mb,
                     block_widths=(512, 1024, 2048), block_heads=8, block_seq=128, block_batches=(1, 4, 16),
                     attention_shapes=((128, 128), (256, 256), (256, 512)), attention_batch=4,
                     attention_head_dim=64,
                     allreduce_bytes=tuple(4 * kb * 4 ** i for i in range(6)), allreduce_reps=5, **engine)
    return Sizes(widths=(1024, 2048, 4096, 8192), tokens=2048, reps=10, min_rep_s=0.05, copy_bytes=1 << 30,
                 block_widths=(768, 1408, 2048), block_heads=16, block_seq=256, block_batches=(1, 4, 16),
                 attention_shapes=((64, 256), (128, 128), (256, 256), (256, 512), (512, 512)), attention_batch=8,
                 attention_head_dim=64,
                 allreduce_bytes=tuple(4 * kb * 4 ** i for i in range(8)), allreduce_reps=10, **engine)


def measured_precisions(precision: str) -> tuple[str, ...]:
    """fp32 and bf16 always, and `precision` if it is neither."""
    return ALWAYS + ((precision,) if precision not in ALWAYS else ())


# --- fits (pure functions, tested on made-up numbers) -----------------------------------------------------------


def _weighted_line(x: list[float], y: list[float], w: list[float]) -> tuple[float, float]:
    """Weighted least squares y = a + b x: (a, b)."""
    sw = sum(w)
    mx = sum(wi * xi for wi, xi in zip(w, x)) / sw
    my = sum(wi * yi for wi, yi in zip(w, y)) / sw
    sxx = sum(wi * (xi - mx) ** 2 for wi, xi in zip(w, x))
    if sxx <= 0:
        raise ValueError("a line through points that all have the same x")
    b = sum(wi * (xi - mx) * (yi - my) for wi, xi, yi in zip(w, x, y)) / sxx
    return my - b * mx, b


def fit_ring(nbytes: list[float], seconds: list[float], ranks: int) -> tuple[float, float, float]:
    """Fit all-reduce times to a ring, time = latency + 2 (n-1)/n bytes / busbw: (latency >= 0, busbw, residual).

    Relative residuals are minimised (weights 1/time^2), so that microsecond calls at 4 KB weigh as much as the
    tens of milliseconds at 64 MB; `residual` is the largest |fit - time| / time.
    """
    if ranks < 2:
        raise ValueError("a ring all-reduce needs at least 2 ranks")
    x = [2 * (ranks - 1) / ranks * b for b in nbytes]
    weights = [1.0 / s ** 2 for s in seconds]
    latency, slope = _weighted_line(x, seconds, weights)
    if latency < 0:
        latency = 0.0
        slope = (sum(w * xi * s for w, xi, s in zip(weights, x, seconds))
                 / sum(w * xi * xi for w, xi in zip(weights, x)))
    if slope <= 0:
        raise ValueError(f"all-reduce time does not grow with its size ({list(zip(nbytes, seconds))})")
    residual = max(abs(latency + slope * xi - s) / s for xi, s in zip(x, seconds))
    return latency, 1.0 / slope, residual


def fit_line(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x: (a, b)."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError("a line needs as many y as x, at least two")
    return _weighted_line(x, y, [1.0] * len(x))


@dataclass(frozen=True)
class EngineFit:
    """One ZeRO stage's engine timings fitted against the parameter tensor count and the parameter count (seconds)."""

    micro: tuple[float, float]  # (a, slope) of a micro-batch's forward + backward + step under DeepSpeed
    baseline: tuple[float, float]  # (a, slope) of plain torch forward + backward of the same models
    step: tuple[float, float]  # (b, c) of the step's own cost (the boundary's step and reduction)
    tensor_overhead: float  # micro slope - baseline slope, >= 0
    step_at_typical: float  # b + typical_tensors x c
    micro_param: float  # seconds per parameter per micro-batch beyond plain torch and the collectives, >= 0
    step_param: float  # seconds per optimizer-partition parameter of the step beyond its collectives, >= 0
    step_overhead: float  # step_at_typical - what step_param already counts of the narrow toy, >= 0


def fit_engine(tensors: list[int], micro: list[float], step: list[float], baseline: list[float],
               extra_params: float, extra_micro: float, extra_partition: float, extra_step: float,
               partition_per_tensor: float, typical_tensors: int = TYPICAL_TENSORS) -> EngineFit:
    """Fit one ZeRO stage's per-micro-batch and per-step engine times (see the module docstring).

    tensors, micro, step, baseline: the narrow toys' tensor counts and times: tensor_overhead = the micro-batch
    slope minus the plain torch slope. extra_*: what the wide toy adds over the narrow one with as many tensors:
    `extra_params` parameters (`extra_partition` of them in this rank's optimizer partition) cost `extra_micro`
    seconds per micro-batch beyond plain torch's and the collectives', and `extra_step` per step beyond the
    collectives': micro_param, step_param. step_overhead = the step fit at `typical_tensors` minus step_param x
    the narrow toy's partition at that count (`partition_per_tensor` per tensor). All floored at 0 (noise on a
    busy machine can tilt a two-point line either way)."""
    micro_fit, baseline_fit, step_fit = fit_line(tensors, micro), fit_line(tensors, baseline), fit_line(tensors, step)
    at_typical = step_fit[0] + typical_tensors * step_fit[1]
    micro_param = max(extra_micro, 0.0) / extra_params
    step_param = max(extra_step, 0.0) / extra_partition
    return EngineFit(micro_fit, baseline_fit, step_fit, max(micro_fit[1] - baseline_fit[1], 0.0), at_typical,
                     micro_param, step_param,
                     max(at_typical - step_param * partition_per_tensor * typical_tensors, 0.0))


def block_train_flops(batch: int, seq: int, width: int, mlp_dim: int) -> int:
    """Forward + backward FLOPs of one SelfAttentionBlock, counted as megacoca.metrics.flops counts a ViT layer:
    2 N (4 W^2 + 2 W M) dense plus 2 (2 S^2 W) attention scores per sequence, times 3."""
    tokens = batch * seq
    forward = 2 * tokens * (4 * width * width + 2 * width * mlp_dim) + batch * 2 * (2 * seq * seq * width)
    return 3 * forward


def block_work(batch: int, seq: int, width: int, heads: int) -> dict[str, float]:
    """The quantities megacoca.plan.timing.Work counts for one SelfAttentionBlock (MLP 4W) over `batch` sequences,
    forward + backward: matmul FLOPs, elementwise elements, attention-score elements and rows."""
    from megacoca.plan.timing import block_elementwise

    return {"flops": block_train_flops(batch, seq, width, 4 * width),
            "elementwise": batch * block_elementwise(seq, width, 4 * width),
            **attention_work(batch, heads, seq, seq)}


def attention_work(batch: int, heads: int, queries: int, keys: int) -> dict[str, float]:
    """Attention-score elements and rows of one fused attention call, forward + backward (3 x forward, as
    megacoca.plan.timing.Work counts them)."""
    return {"attention": 3 * batch * heads * queries * keys, "attention_rows": 3 * batch * heads * queries}


def fit_rates(works: list[dict[str, float]], seconds: list[float]) -> tuple[float, dict[str, float]]:
    """Fit seconds = overhead + sum over kinds of work[kind] / rate[kind] with every coefficient >= 0, minimising
    relative residuals (each point counts alike, whatever its size): (overhead, {kind: rate}); a kind whose best
    coefficient is 0 (its cost hides in the others at these shapes) gets no rate. Exhaustive over the subsets of
    the (at most four) terms: the best fit whose coefficients are all positive."""
    import itertools

    import numpy as np

    if len(works) != len(seconds) or not works:
        raise ValueError("fit_rates needs as many times as work counts, at least one")
    if min(seconds) <= 0:
        raise ValueError(f"fit_rates needs times > 0 (relative residuals), got {seconds}")
    kinds = list(works[0])
    columns = {"overhead": [1.0] * len(works), **{k: [w[k] for w in works] for k in kinds}}
    y = np.asarray(seconds, dtype=float)
    best = None
    for size in range(1, len(columns) + 1):
        for subset in itertools.combinations(columns, size):
            a = np.asarray([columns[c] for c in subset], dtype=float).T / y[:, None]
            coef, *_ = np.linalg.lstsq(a, np.ones_like(y), rcond=None)
            if (coef <= 0).any():
                continue
            error = float(((a @ coef - 1) ** 2).sum())
            if best is None or error < best[0] - 1e-12:
                best = (error, dict(zip(subset, coef)))
    if best is None:
        raise ValueError(f"times do not grow with the work ({list(zip(works, seconds))}): no rate to fit")
    coef = best[1]
    return float(coef.get("overhead", 0.0)), {k: 1.0 / coef[k] for k in kinds if k in coef}


# --- one rank's measurements --------------------------------------------------------------------------------------


class _Timer:
    """Times a call on every rank of the default process group at once (group=True), or on this rank alone."""

    def __init__(self, device, reps: int, min_rep_s: float, group: bool) -> None:
        self.device, self.reps, self.min_rep_s, self.group = device, reps, min_rep_s, group

    def _barrier(self) -> None:
        if self.group:
            import torch.distributed as dist

            dist.barrier()

    def _agree(self, inner: int) -> int:
        """The largest repeat count of any rank: the same on all (a collective must be called as often on each)."""
        if not self.group:
            return inner
        import torch
        import torch.distributed as dist

        count = torch.tensor([float(inner)], device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        return int(count.item())

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn) -> float:
        """Median seconds of one call of fn over `reps` repetitions after two warm-up calls; a repetition repeats the
        call until it lasts min_rep_s (the longest count of any rank), and starts together on all ranks."""
        fn()  # warm-up (first-call work: allocation, kernel compilation, lazy init)
        self._sync()
        start = time.perf_counter()
        fn()
        self._sync()
        inner = self._agree(max(1, math.ceil(self.min_rep_s / max(time.perf_counter() - start, 1e-9))))
        times = []
        for _ in range(self.reps):
            self._barrier()
            self._sync()
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            self._sync()
            times.append((time.perf_counter() - start) / inner)
        return statistics.median(times)


_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _dtype(precision: str):
    import torch

    return getattr(torch, _DTYPES[precision])


def _measure_compute(timer: _Timer, sizes: Sizes, precisions: tuple[str, ...], device) -> dict:
    import torch

    from megacoca.models.coca.layers import SelfAttentionBlock

    out: dict = {"matmul": {}, "block": {}}
    for precision in precisions:
        dtype = _dtype(precision)
        out["matmul"][precision] = {}
        for width in sizes.widths:
            x = torch.randn(sizes.tokens, width, device=device, dtype=dtype)
            up = torch.randn(width, 4 * width, device=device, dtype=dtype) / width ** 0.5
            down = torch.randn(4 * width, width, device=device, dtype=dtype) / (2 * width)
            out["matmul"][precision][width] = timer(lambda: (x @ up) @ down)
            del x, up, down

    src = torch.empty(sizes.copy_bytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)
    out["copy"] = timer(lambda: dst.copy_(src))
    del src, dst

    out["attention"] = {}
    b, heads, dh = sizes.attention_batch, sizes.block_heads, sizes.attention_head_dim
    for precision in precisions:
        dtype = _dtype(precision)
        out["attention"][precision] = {}
        for queries, keys in sizes.attention_shapes:
            q = torch.randn(b, heads, queries, dh, device=device, dtype=dtype, requires_grad=True)
            k = torch.randn(b, heads, keys, dh, device=device, dtype=dtype, requires_grad=True)
            v = torch.randn(b, heads, keys, dh, device=device, dtype=dtype, requires_grad=True)
            grad = torch.randn(b, heads, queries, dh, device=device, dtype=dtype)

            def attention():
                q.grad = k.grad = v.grad = None
                torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(grad)

            out["attention"][precision][(queries, keys)] = timer(attention)
            del q, k, v, grad

    heads, seq = sizes.block_heads, sizes.block_seq
    for precision in precisions:
        dtype = _dtype(precision)
        out["block"][precision] = {}
        for w in sizes.block_widths:
            torch.manual_seed(0)
            block = SelfAttentionBlock(w, heads, 4 * w, 1e-5, "auto").to(device=device, dtype=dtype)
            params = list(block.parameters())
            for batch in sizes.block_batches:
                x = torch.randn(batch, seq, w, device=device, dtype=dtype, requires_grad=True)
                grad = torch.randn(batch, seq, w, device=device, dtype=dtype)

                def forward_backward():
                    x.grad = None
                    for p in params:
                        p.grad = None  # zero_grad(set_to_none=True): backward allocates them, as in training
                    block(x).backward(grad)

                out["block"][precision][(w, batch)] = timer(forward_backward)
            del block, params, x, grad
    return out


def engine_toys(sizes: Sizes) -> list[tuple[int, int]]:
    """(width, K) of every toy the engines train: the narrow one at each K (the per-tensor costs), and a wide one at
    the smallest K (as many tensors, many more parameters: the per-parameter costs)."""
    return [(sizes.engine_width, k) for k in sizes.engine_blocks] + [(sizes.engine_heavy_width,
                                                                      sizes.engine_blocks[0])]


def toy_model(width: int, blocks: int):
    """The engines' model: `blocks` x (Linear(W, W), LayerNorm(W)), 4 small tensors each, negligible FLOPs."""
    import torch

    return torch.nn.Sequential(*(layer for _ in range(blocks)
                                 for layer in (torch.nn.Linear(width, width), torch.nn.LayerNorm(width))))


def engine_config(stage: int, sizes: Sizes, dp: int) -> dict:
    """The DeepSpeed config megacoca trains ZeRO `stage` with, batch fields for the toy, every tensor partitioned."""
    from megacoca.config.deepspeed import load_json

    ds = load_json(ENGINE_CONFIGS[stage][0])
    ds.update(train_micro_batch_size_per_gpu=sizes.engine_micro_batch,
              gradient_accumulation_steps=sizes.engine_accum,
              train_batch_size=sizes.engine_micro_batch * sizes.engine_accum * dp,
              gradient_clipping=1.0)  # megacoca's default optim.grad_clip: the step computes the gradient norm
    if stage == 3:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return ds


def _measure_engines(sizes: Sizes, device, sync) -> dict:
    """Every rank at once: per ZeRO stage and toy size K, the medians of a micro-batch (not the last of its step:
    forward, backward, step), of the last one (forward, backward) and of the step that follows it; per precision
    and K, plain torch forward + backward of the same model. Seconds on this rank."""
    import logging
    import warnings

    import torch
    import torch.distributed as dist

    import deepspeed
    from megacoca.launch.deepspeed_comm import without_shared_memory_allreduce

    deepspeed.utils.logger.setLevel(logging.WARNING)
    without_shared_memory_allreduce()
    width, accum = sizes.engine_width, sizes.engine_accum

    def loss_of(out):
        return out.float().square().mean()

    def timed(fn) -> float:
        dist.barrier()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    toys = engine_toys(sizes)
    out: dict = {"baseline": {}, "engine": {}, "params": {}}
    for precision in sorted({p for _, p in ENGINE_CONFIGS.values()}):
        dtype = _dtype(precision)
        out["baseline"][precision] = {}
        for width, blocks in toys:
            torch.manual_seed(0)
            model = toy_model(width, blocks).to(device=device, dtype=dtype)
            x = torch.randn(sizes.engine_micro_batch, width, device=device, dtype=dtype)
            times = []
            for step in range(sizes.engine_warmup_steps + sizes.engine_steps):
                for _ in range(accum):
                    seconds = timed(lambda: loss_of(model(x)).backward())
                    if step >= sizes.engine_warmup_steps:
                        times.append(seconds)
                model.zero_grad(set_to_none=True)
            out["baseline"][precision][(width, blocks)] = statistics.median(times)
            del model

    dp = dist.get_world_size()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # DeepSpeed's deprecated torch.distributed spellings
        for stage, (_, precision) in ENGINE_CONFIGS.items():
            dtype = _dtype(precision)
            for width, blocks in toys:
                torch.manual_seed(0)
                model = toy_model(width, blocks)
                out["params"][(width, blocks)] = sum(p.numel() for p in model.parameters())
                decay = [p for p in model.parameters() if p.dim() > 1]  # as megacoca.trainer.param_groups
                no_decay = [p for p in model.parameters() if p.dim() <= 1]
                optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                                               {"params": no_decay, "weight_decay": 0.0}], lr=1e-4)
                engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                  config=engine_config(stage, sizes, dp), dist_init_required=False)
                x = torch.randn(sizes.engine_micro_batch, width, device=engine.device, dtype=dtype)

                def micro_batch():
                    engine.backward(loss_of(engine(x)))
                    engine.step()  # not a boundary: the engine only counts it

                times: dict[str, list[float]] = {"micro": [], "last": [], "step": []}
                for step in range(sizes.engine_warmup_steps + sizes.engine_steps):
                    step_times = [("micro", timed(micro_batch)) for _ in range(accum - 1)]
                    step_times.append(("last", timed(lambda: engine.backward(loss_of(engine(x))))))
                    step_times.append(("step", timed(engine.step)))
                    if step >= sizes.engine_warmup_steps:
                        for kind, seconds in step_times:
                            times[kind].append(seconds)
                out["engine"][(stage, width, blocks)] = {kind: statistics.median(t) for kind, t in times.items()}
                engine.destroy()
                del engine, optimizer, model
    return out


def _measure_allreduce(timer: _Timer, sizes: Sizes, device) -> dict:
    import torch
    import torch.distributed as dist

    out = {}
    for nbytes in sizes.allreduce_bytes:
        tensor = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
        out[nbytes] = timer(lambda: dist.all_reduce(tensor))
    return out


def _rank_main(rank: int, world: int, store_path: str, compute_ranks: int, device_type: str,
               precisions: tuple[str, ...], sizes: Sizes, threads: int, collectives: bool) -> dict:
    """One rank: compute measurements if rank < compute_ranks (all of them at once), then the DeepSpeed engines on
    every rank, then the all-reduce sweep (if `collectives`)."""
    import torch
    import torch.distributed as dist

    if device_type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(threads)
        device = torch.device("cpu")
    # what a launcher sets and DeepSpeed reads (its accelerator, its comm backend); the group itself comes from here
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    kwargs = {"device_id": device} if device_type == "cuda" else {}
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", store=dist.FileStore(store_path, world),
                            rank=rank, world_size=world, timeout=datetime.timedelta(minutes=15), **kwargs)
    try:
        result: dict = {}
        if rank < compute_ranks:  # all compute ranks at once (a lone rank 0 when ranks == 1)
            result.update(_measure_compute(_Timer(device, sizes.reps, sizes.min_rep_s, compute_ranks > 1), sizes,
                                           precisions, device))
        dist.barrier()
        sync = (lambda: torch.cuda.synchronize(device)) if device_type == "cuda" else (lambda: None)
        result["engines"] = _measure_engines(sizes, device, sync)
        if collectives:
            dist.barrier()
            timer = _Timer(device, sizes.allreduce_reps, sizes.min_rep_s, True)
            result["allreduce"] = _measure_allreduce(timer, sizes, device)
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(world: int, args: tuple, timeout: float, preload: list[str] = PRELOAD) -> list[dict]:
    """_rank_main(rank, world, store_path, *args) on `world` forked processes (megacoca.launch.ranks: `preload`
    imported once in the forkserver, if this call starts it), each setting up its own process group; the results
    in rank order."""
    from megacoca.launch.ranks import run_ranks

    return run_ranks(_rank_main, world, *args, timeout=timeout, init=False, preload=preload,
                     what="calibration failed on ", grace=1.0)


# --- the profile -------------------------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def _host_memory() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _gpu_preset(name: str, memory: float) -> DeviceProfile | None:
    upper = name.upper()
    if "H200" in upper:
        return PRESETS["h200"]
    if "H100" in upper:
        return PRESETS["h100"]
    if "A100" in upper:
        return PRESETS["a100-80gb" if memory > 60e9 else "a100-40gb"]
    return None


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


@dataclass
class Measurement:
    """What the ranks measured (`results`, one dict per process, rank order) and where: build_profile's input."""

    ranks: int  # compute ranks (the first `ranks` results)
    world: int  # processes of the all-reduce sweep (0: none ran)
    processes: int  # processes that ran the DeepSpeed engines (all of them)
    precisions: tuple[str, ...]  # measured: fp32, bf16 (and the one asked for)
    device: str  # "cpu" or "cuda"
    device_name: str
    memory_bytes: float
    gpus_per_node: int
    threads: int  # CPU threads per rank (0 on CUDA)
    quick: bool
    sizes: Sizes
    results: list
    seconds: float  # wall time of the measurements


def measure(ranks: int = 1, precision: str = "fp32", device: str | None = None, quick: bool = False, *,
            threads: int | None = None, timeout: float = 900) -> Measurement:
    """Run the measurements on `ranks` co-located ranks (see the module docstring); fp32 and bf16 are measured
    whatever `precision` says (fp16 as well when it is asked for)."""
    import torch

    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {precision!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch sees no CUDA device")
        gpus = torch.cuda.device_count()
        if ranks > gpus:
            raise ValueError(f"{ranks} ranks but {gpus} GPU(s): one rank per GPU")
        props = torch.cuda.get_device_properties(0)
        device_name, memory_bytes, gpus_per_node, threads = props.name, float(props.total_memory), gpus, 0
        world = max(ranks, min(2, gpus))
    else:
        threads = threads or int(os.environ.get("OMP_NUM_THREADS") or 1)
        device_name, memory_bytes, gpus_per_node = _cpu_name(), _host_memory() / ranks, ranks
        world = max(ranks, 2)
    sizes = sizes_for(device, quick)
    precisions = measured_precisions(precision)
    started = time.perf_counter()
    results = _run(world, (ranks, device, precisions, sizes, threads, world >= 2), timeout,
                   PRELOAD_CPU if device == "cpu" else PRELOAD)
    return Measurement(ranks, world if world >= 2 else 0, world, precisions, device, device_name, memory_bytes,
                       gpus_per_node, threads, quick, sizes, results, time.perf_counter() - started)


def _fit_engines(m: Measurement, latency: float, bandwidth: float) -> dict[int, EngineFit]:
    """Per ZeRO stage, the engine fit of the slowest process's medians (see the module docstring); the collectives
    the time model counts (megacoca.plan.timing.dp_comm at this latency and bandwidth) are taken out of the wide
    toy's excess."""
    from megacoca.plan.timing import dp_comm

    sizes, runs = m.sizes, [r["engines"] for r in m.results]
    narrow, blocks = sizes.engine_width, sizes.engine_blocks
    wide = (sizes.engine_heavy_width, blocks[0])
    tensors = [_TENSORS_PER_BLOCK * k for k in blocks]
    params = runs[0]["params"]
    dp = m.processes
    fits = {}
    for stage, (_, precision) in ENGINE_CONFIGS.items():
        def slowest(kind: str, toy: tuple[int, int]) -> float:
            return max(run["engine"][(stage, *toy)][kind] for run in runs)

        def step_of(toy: tuple[int, int]) -> float:
            # the step's own cost: the boundary's engine.step, and what the last micro-batch costs beyond the others
            # (ZeRO-0/1 reduce the gradients there)
            return slowest("step", toy) + max(slowest("last", toy) - slowest("micro", toy), 0.0)

        def base(toy: tuple[int, int]) -> float:
            return max(run["baseline"][precision][toy] for run in runs)

        def partition(count: int) -> float:
            return count if stage == 0 else count / dp

        element_bytes = 4 if precision == "fp32" else 2
        light = (narrow, blocks[0])
        comm = {toy: dp_comm(stage, element_bytes * params[toy], dp, bandwidth, latency) for toy in (light, wide)}
        extra_micro = (slowest("micro", wide) - slowest("micro", light) - (base(wide) - base(light))
                       - (comm[wide][0] - comm[light][0]))
        extra_step = step_of(wide) - step_of(light) - (comm[wide][1] - comm[light][1])
        toys = [(narrow, k) for k in blocks]
        fits[stage] = fit_engine(tensors, [slowest("micro", t) for t in toys], [step_of(t) for t in toys],
                                 [base(t) for t in toys], params[wide] - params[light], extra_micro,
                                 partition(params[wide] - params[light]), extra_step,
                                 partition(params[(narrow, blocks[-1])]) / tensors[-1])
    return fits


def build_profile(m: Measurement) -> tuple[DeviceProfile, dict]:
    """The DeviceProfile of a measurement, and the fits behind it (rates per width, block fits per precision,
    engine fits per ZeRO stage, the ring fit's residual) for tests and reports."""
    import torch

    from megacoca.metrics.peak import peak_flops

    sizes, compute = m.sizes, m.results[: m.ranks]
    notes: list[str] = []
    per_width = {p: {w: statistics.fmean(16 * sizes.tokens * w * w / r["matmul"][p][w] for r in compute)
                     for w in sizes.widths} for p in m.precisions}
    matmul = {p: statistics.median(rates.values()) for p, rates in per_width.items()}
    copy_bw = statistics.fmean(2 * sizes.copy_bytes / r["copy"] for r in compute)

    # the fused attention first (its cost per row and per score element), then the blocks less their attention
    attention_works = [attention_work(sizes.attention_batch, sizes.block_heads, q, k)
                       for q, k in sizes.attention_shapes]
    shapes = [(w, b) for w in sizes.block_widths for b in sizes.block_batches]
    block_works = [block_work(b, sizes.block_seq, w, sizes.block_heads) for w, b in shapes]
    block_times, block_fit, attention_fit = {}, {}, {}
    for p in m.precisions:
        attention_times = [statistics.fmean(r["attention"][p][shape] for r in compute)
                           for shape in sizes.attention_shapes]
        attention_fit[p] = fit_rates(attention_works, attention_times)
        calls, attention_rates = attention_fit[p]

        def attention_seconds(work: dict) -> float:
            return calls + sum(work[kind] / rate for kind, rate in attention_rates.items())

        block_times[p] = [statistics.fmean(r["block"][p][shape] for r in compute) for shape in shapes]
        # the attention fit comes from separate calls: on a noisy run it can claim all of a small block's time, so
        # a block keeps at least a tenth of its time for its own work (a zero would leave nothing to fit)
        overhead, rates = fit_rates([{k: w[k] for k in ("flops", "elementwise")} for w in block_works],
                                    [max(t - attention_seconds(w), 0.1 * t)
                                     for t, w in zip(block_times[p], block_works)])
        block_fit[p] = (overhead + calls, {**rates, **attention_rates})

    residual = None
    if m.world:
        counts = sizes.allreduce_bytes
        ar_times = [statistics.fmean(r["allreduce"][n] for r in m.results) for n in counts]
        latency, busbw, residual = fit_ring(list(counts), ar_times, m.world)
        backend = "nccl" if m.device == "cuda" else "gloo"
        allreduce_note = (f"all-reduce ({backend}, {m.world} ranks, {counts[0] >> 10} KB .. {counts[-1] >> 20} MB) "
                          f"fitted as a ring: {latency * 1e6:.0f} us + bytes / {_si(busbw, 'B/s')} bus bandwidth, "
                          f"largest residual {residual:.0%}")
        if m.world > m.ranks:
            allreduce_note += (f" (over {m.world} processes: ranks=1 runs no collective; the second process idled "
                               "during the compute measurements)")
    else:
        preset = _gpu_preset(m.device_name, m.memory_bytes)
        if preset is None:
            raise ValueError(f"one {m.device_name}: no all-reduce to measure and no preset to take the link "
                             "figures from; calibrate with 2 GPUs or start from a preset profile")
        latency, busbw = preset.collective_latency_s, preset.intra_node_bw
        allreduce_note = (f"all-reduce NOT measured (one GPU): latency and intra-node bandwidth of the {preset.name} "
                          "preset")
    notes.append("inter-node bandwidth NOT measured (one host): set equal to the intra-node figure")
    engines = _fit_engines(m, latency, busbw)

    if m.device == "cuda":
        peaks = {p: v for p in m.precisions if (v := peak_flops(m.device_name, p)) is not None}
        for p in m.precisions:
            if p not in peaks:
                peaks[p] = matmul[p]
                notes.append(f"no datasheet {p} peak for {m.device_name}: peak_flops[{p}] is the measured matmul rate")
        where = f"{m.ranks} x {m.device_name} (of {m.gpus_per_node})"
    else:
        peaks = dict(matmul)
        notes.append("a CPU has no datasheet peak: peak_flops is the measured matmul rate")
        where = f"{m.ranks} CPU rank(s) x {m.threads} thread(s) on {m.device_name} ({os.cpu_count()} CPUs)"

    def us(seconds: float) -> str:
        return f"{seconds * 1e6:.0f} us"

    rates = "; ".join(f"{p} " + ", ".join(f"{w}: {_si(r, 'FLOP/s')}" for w, r in per_width[p].items())
                      for p in m.precisions)
    def per(p: str, kind: str, unit: str = "/s") -> str:
        rate = block_fit[p][1].get(kind)
        return _si(rate, unit) if rate else "(no cost)"

    blocks_note = "; ".join(
        f"{p} {us(block_fit[p][0])} + FLOPs / {per(p, 'flops', 'FLOP/s')} + elementwise elements / "
        f"{per(p, 'elementwise')} + attention rows / {per(p, 'attention_rows')} + attention-score elements / "
        f"{per(p, 'attention')}" for p in m.precisions)
    k = sizes.engine_blocks
    engine_where = (f"{m.processes} processes ({'nccl' if m.device == 'cuda' else 'gloo'})"
                    + (" (ranks=1: the engines ran over 2)" if m.processes > m.ranks else ""))
    engines_note = "; ".join(
        f"ZeRO-{s} ({ENGINE_CONFIGS[s][0]}) micro-batch {us(f.micro[0])} + {us(f.micro[1])}/tensor (torch "
        f"{us(f.baseline[1])}/tensor), step {us(f.step[0])} + {us(f.step[1])}/tensor = {us(f.step_at_typical)} at "
        f"{TYPICAL_TENSORS}, per parameter {f.micro_param * 1e9:.2f} ns/micro-batch and {f.step_param * 1e9:.2f} "
        f"ns/step (optimizer partition)" for s, f in engines.items())
    source = (
        f"calibrated by `megacoca plan --calibrate` on {socket.gethostname()}, {where}, torch {torch.__version__}, "
        f"DeepSpeed {_deepspeed_version()}, {datetime.date.today().isoformat()}, "
        f"{'quick, ' if m.quick else ''}{m.seconds:.0f} s. "
        f"matmul ({', '.join(m.precisions)}): (T x W) @ (W x 4W) and back, T = {sizes.tokens}, all ranks at once, "
        f"median of {sizes.reps} after 2 warm-ups; per W {rates}; the median over W. "
        f"attention: fused (SDPA) forward + backward, batch {sizes.attention_batch} x {sizes.block_heads} heads of "
        f"{sizes.attention_head_dim}, (queries, keys) {', '.join(map(str, sizes.attention_shapes))}, fitted as "
        f"per call + rows / rate + score elements / rate; blocks: SelfAttentionBlock W "
        f"{', '.join(map(str, sizes.block_widths))} x {sizes.block_seq} tokens, {sizes.block_heads} heads, batches "
        f"{', '.join(map(str, sizes.block_batches))}, less their attention, fitted as overhead + FLOPs / rate + "
        f"elementwise elements / rate (relative least squares, coefficients >= 0); per block: {blocks_note}. "
        f"DeepSpeed engines on {engine_where}: a toy of K x (Linear + LayerNorm) W {sizes.engine_width}, K "
        f"{', '.join(map(str, k))} ({', '.join(str(_TENSORS_PER_BLOCK * b) for b in k)} tensors), micro-batch "
        f"{sizes.engine_micro_batch}, {sizes.engine_accum} micro-batches per step, median of {sizes.engine_steps} "
        f"steps after {sizes.engine_warmup_steps}, the slowest rank: {engines_note}; tensor overhead = micro-batch "
        f"slope - torch slope; per parameter: a W {sizes.engine_heavy_width} toy at K {sizes.engine_blocks[0]} "
        f"against the W {sizes.engine_width} one, beyond plain torch and the collectives the time model counts; "
        f"step overhead = the step at {TYPICAL_TENSORS} tensors less its per-parameter part. CPU ranks: "
        f"collectives overlap nothing (overlap 0). "
        f"memory_bw: a {sizes.copy_bytes >> 20} MB copy, read + write. {allreduce_note}. " + ". ".join(notes) + "."
    )
    kind = "cpu" if m.device == "cpu" else m.device_name.replace(" ", "-").lower()
    profile = DeviceProfile(
        name=f"calibrated-{kind}-{m.ranks}r", peak_flops=peaks, matmul_flops=matmul,
        # a whole block as the fit sees it: its intercept, and a rate per kind of work
        block_overhead_s={p: block_fit[p][0] for p in m.precisions},
        block_rates={p: block_fit[p][1] for p in m.precisions},
        step_overhead_s={str(s): f.step_overhead for s, f in engines.items()},
        micro_param_s={str(s): f.micro_param for s, f in engines.items()},
        step_param_s={str(s): f.step_param for s, f in engines.items()},
        overlap=0.0 if m.device == "cpu" else PRESETS["a100-80gb"].overlap,
        tensor_overhead_s={str(s): f.tensor_overhead for s, f in engines.items()},
        # the fixed part of a micro-batch under each stage beyond plain torch's (collective latencies, hooks)
        micro_overhead_s={str(s): max(f.micro[0] - f.baseline[0], 0.0) for s, f in engines.items()},
        intra_node_bw=busbw, inter_node_bw=busbw, collective_latency_s=latency, collective_ranks=m.world,
        memory_bw=copy_bw,
        memory_bytes=m.memory_bytes, gpus_per_node=m.gpus_per_node, source=source)
    fits = {"matmul_per_width": per_width, "block_shapes": shapes, "block_works": block_works,
            "block_seconds": block_times, "block_fit": block_fit, "attention_fit": attention_fit, "engines": engines,
            "allreduce_residual": residual}
    return profile, fits


def _deepspeed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deepspeed")
    except PackageNotFoundError:
        return "unknown"


def calibrate(ranks: int = 1, precision: str = "fp32", device: str | None = None, quick: bool = False, *,
              threads: int | None = None, timeout: float = 900) -> DeviceProfile:
    """Measure this machine (CPU, or the local GPUs) as `ranks` co-located ranks; see the module docstring.

    precision: kept for compatibility; fp32 and bf16 are both measured whatever it says (one profile plans
    layouts in either), and fp16 as well when it is asked for. threads: CPU threads per rank; default
    OMP_NUM_THREADS if set, else 1 (what torchrun and megacoca's rank harnesses give each CPU rank). timeout:
    seconds before ranks that have not finished are killed.
    """
    profile = build_profile(measure(ranks, precision, device, quick, threads=threads, timeout=timeout))[0]
    if ranks >= 2 and not quick:
        profile = calibrate_trainer(profile, ranks, timeout=timeout)
    return profile


# The trainer calibration's model: coca_tiny cut to 2 ViT blocks, 1 text block and 1 decoder layer (the planner's
# validation models are others: benchmarks/plan_measure.py).
TRAINER_CALIBRATION = {"flavor": "coca_tiny", "vision_layers": 2, "text_layers": 1, "decoder_layers": 1,
                       "kernels": "torch"}
_TRAINER_CONFIGS = {0: ("zero0_fp32", []), 1: ("zero1_bf16", []), 2: ("zero2_bf16", []),
                    3: ("zero3_bf16", ["parallel.deepspeed_overrides.zero_optimization."
                                       "stage3_param_persistence_threshold=0"])}


def fit_residuals(points: dict[tuple[int, int], float]) -> tuple[float, float, float]:
    """Residual step times at (micro-batch b, accumulation a) -> (per step, per micro-batch, per sample), from
    r(b, a) = step + a (micro + b sample) through three points (b1, 1), (b1, a2), (b2, 1); a negative per-sample
    or per-step part (noise) is floored at 0 and the others refitted."""
    b1, b2 = min(b for b, _ in points), max(b for b, _ in points)
    a2 = max(a for _, a in points)
    r11, r12, r21 = points[(b1, 1)], points[(b1, a2)], points[(b2, 1)]
    at_b1 = (r12 - r11) / (a2 - 1)  # micro + b1 sample
    step = r11 - at_b1
    sample = (r21 - step - at_b1) / (b2 - b1)
    if sample < 0:
        sample = 0.0
    micro = at_b1 - b1 * sample
    if step < 0:
        step, micro = 0.0, statistics.fmean((r - a * b * sample) / a for (b, a), r in points.items())
    return step, max(micro, 0.0), sample


def calibrate_trainer(profile: DeviceProfile, ranks: int, micro_batch: int = 4, timeout: float = 900
                      ) -> DeviceProfile:
    """What megacoca's Trainer costs beyond the engine and the blocks: real training steps of a small CoCa
    (TRAINER_CALIBRATION) on `ranks` ranks, each step time minus the time model's prediction with `profile`.
    Per ZeRO stage, data-parallel steps at micro-batches b and 2b and accumulation 1 and 3, fitted as per step + per
    micro-batch + per sample (fit_residuals: the contrastive all-gather, the losses, the embeddings, the step
    guard's and the logger's reductions): added to `step_overhead_s` and `micro_overhead_s`; the per-sample part,
    the median over the stages, is `sample_overhead_s`. Then tensor parallelism (tp 2) and a pipeline (pp 2) under
    ZeRO-1 at two accumulation counts: what is left per micro-batch, per tensor-parallel collective call
    (megacoca.plan.comm.analytic_comm's count: their autograd functions and the collectives' real latency inside a
    step) is `parallel_overhead_s["tp"]`, and per micro-batch `["pp"]` (the runner's sends and bookkeeping); both
    floored at 0."""
    import dataclasses

    from megacoca.config.flavors import get_flavor
    from megacoca.plan.comm import analytic_comm
    from megacoca.plan.measure import measure_layout
    from megacoca.config.layout import Layout
    from megacoca.plan.memory import default_text_ahead
    from megacoca.plan.timing import predict_time

    choice = dict(TRAINER_CALIBRATION)
    cfg = get_flavor(choice.pop("flavor"), **choice)

    def residual(candidate: DeviceProfile, zero: int, b: int, accum: int, tp: int = 1, pp: int = 1,
                 extra: tuple = ()) -> float:
        dp = ranks // (tp * pp)
        ds = _TRAINER_CONFIGS[zero][0]
        overrides = [f"parallel.deepspeed_config={ds}", f"schedule.micro_batch_size={b}", f"parallel.tp={tp}",
                     f"parallel.pp={pp}", f"schedule.global_batch_size={b * dp * accum}", *extra]
        measured = max(rank["step_time_s"] for rank in measure_layout(overrides, ranks, cfg, steps=6,
                                                                       timeout=timeout))
        layout = Layout(tp=tp, pp=pp, dp=dp, zero_stage=zero, micro_batch=b, grad_accum=accum,
                        precision="fp32" if zero == 0 else "bf16", text_ahead=default_text_ahead(cfg, pp, accum))
        return measured - predict_time(cfg, layout, candidate).seconds

    step, micro, samples, notes = dict(profile.step_overhead_s), dict(profile.micro_overhead_s), [], []
    for zero, (_, extra) in _TRAINER_CONFIGS.items():
        points = {(b, a): residual(profile, zero, b, a, extra=tuple(extra))
                  for b, a in ((micro_batch, 1), (micro_batch, 3), (2 * micro_batch, 1))}
        per_step, per_micro, per_sample = fit_residuals(points)
        step[str(zero)] = step.get(str(zero), 0.0) + per_step
        micro[str(zero)] = micro.get(str(zero), 0.0) + per_micro
        samples.append(per_sample)
        notes.append(f"ZeRO-{zero} +{per_step * 1e3:.1f} ms/step +{per_micro * 1e3:.1f} ms/micro-batch "
                     f"(+{per_sample * 1e3:.2f} ms/sample)")
    profile = dataclasses.replace(profile, step_overhead_s=step, micro_overhead_s=micro,
                                  sample_overhead_s=statistics.median(samples))
    parallel = {}
    for kind, degree in (("tp", {"tp": 2}), ("pp", {"pp": 2})):
        if ranks % 2:
            continue
        accums = (2, 4) if kind == "pp" else (1, 3)
        low, high = (residual(profile, 1, micro_batch, a, **degree) for a in accums)
        per_micro = (high - low) / (accums[1] - accums[0])
        if kind == "tp":  # per tensor-parallel collective call: it transfers to models with other layer counts
            calls = sum(term["calls"] for term in analytic_comm(cfg, micro_batch, 2, False))
            parallel[kind] = max(per_micro, 0.0) / calls
            notes.append(f"tp 2 +{parallel[kind] * 1e6:.0f} us per tensor-parallel collective")
        else:  # floored like the others: a negative residual here is mostly noise (measured: crediting it put
            # held-out pipelines at 0.6 of their time)
            parallel[kind] = max(per_micro, 0.0)
            notes.append(f"pp 2 +{parallel[kind] * 1e3:.1f} ms/micro-batch (fitted {per_micro * 1e3:+.1f})")
    source = (profile.source + f"; the Trainer beyond the engine (real steps of coca_tiny cut to "
              f"{cfg.vision_layers}/{cfg.text_layers}/{cfg.decoder_layers} layers, minus the time model): "
              + ", ".join(notes))
    return dataclasses.replace(profile, parallel_overhead_s=parallel, source=source)


def save_profile(profile: DeviceProfile, path: str) -> None:
    """Write the profile as JSON (DeviceProfile.load / get_profile read it back), replacing any file there."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as f:
        f.write(profile.to_json() + "\n")
    os.replace(f.name, path)
