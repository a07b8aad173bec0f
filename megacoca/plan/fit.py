"""Turning a calibration's measurements into a DeviceProfile (`megacoca plan --calibrate`; issue 11, "Calibration").

megacoca.profiling.calibrate runs the measurements on `ranks` co-located ranks (every rank at the same time, so
that the figures describe one rank among `ranks`) and hands them over as a `Measurement`; `build_profile` fits
them. Both precisions are measured (fp32 and bf16, and fp16 when asked for), so that one profile plans fp32 and
bf16 layouts. What each figure is, and how it is fitted:

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

The fits are pure functions of the numbers (tested on made-up ones): no rank, no process group. The generic
least-squares ones (a line, a ring, rates per kind of work, a step's residual parts) are megacoca.plan.least_squares.
"""

from __future__ import annotations

import datetime
import os
import socket
import statistics
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import torch

from megacoca.metrics.peak import peak_flops
from megacoca.plan.least_squares import fit_line, fit_rates, fit_ring
from megacoca.plan.presets import PRESETS, gpu_preset
from megacoca.plan.profile import DeviceProfile
from megacoca.plan.timing import block_elementwise, dp_comm

# the DeepSpeed config megacoca trains each ZeRO stage with (ds_configs/), and its precision; ZeRO-3 in both the
# precisions megacoca ships it in ("3/fp32": its engine costs are its own, measured: fp32 ZeRO-3 steps on CPU ranks
# ran at 0.6x of a prediction that borrowed bf16's). The profile keys them as str(key) (megacoca.plan.profile).
ENGINE_CONFIGS = {0: ("zero0_fp32", "fp32"), 1: ("zero1_bf16", "bf16"), 2: ("zero2_bf16", "bf16"),
                  3: ("zero3_bf16", "bf16"), "3/fp32": ("zero3_fp32", "fp32")}


def engine_stage(key) -> int:
    """The ZeRO stage of an ENGINE_CONFIGS key (3 for "3/fp32")."""
    return int(str(key).split("/")[0])

TYPICAL_TENSORS = 120  # parameter tensors of a small CoCa on one rank: where the step fit is read off

TENSORS_PER_BLOCK = 4  # the engines' toy: Linear(W, W) + LayerNorm(W): weight, bias, weight, bias


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
    return {"flops": block_train_flops(batch, seq, width, 4 * width),
            "elementwise": batch * block_elementwise(seq, width, 4 * width),
            **attention_work(batch, heads, seq, seq)}


def attention_work(batch: int, heads: int, queries: int, keys: int) -> dict[str, float]:
    """Attention-score elements and rows of one fused attention call, forward + backward (3 x forward, as
    megacoca.plan.timing.Work counts them)."""
    return {"attention": 3 * batch * heads * queries * keys, "attention_rows": 3 * batch * heads * queries}


# --- the profile ---------------------------------------------------------------------------------------------


def _fit_engines(m: Measurement, latency: float, bandwidth: float) -> dict[int, EngineFit]:
    """Per ZeRO stage, the engine fit of the slowest process's medians (see the module docstring); the collectives
    the time model counts (megacoca.plan.timing.dp_comm at this latency and bandwidth) are taken out of the wide
    toy's excess."""
    sizes, runs = m.sizes, [r["engines"] for r in m.results]
    narrow, blocks = sizes.engine_width, sizes.engine_blocks
    wide = (sizes.engine_heavy_width, blocks[0])
    tensors = [TENSORS_PER_BLOCK * k for k in blocks]
    params = runs[0]["params"]
    dp = m.processes
    fits = {}
    for key, (_, precision) in ENGINE_CONFIGS.items():
        stage = engine_stage(key)

        def slowest(kind: str, toy: tuple[int, int]) -> float:
            return max(run["engine"][(key, *toy)][kind] for run in runs)

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
        fits[key] = fit_engine(tensors, [slowest("micro", t) for t in toys], [step_of(t) for t in toys],
                               [base(t) for t in toys], params[wide] - params[light], extra_micro,
                               partition(params[wide] - params[light]), extra_step,
                               partition(params[(narrow, blocks[-1])]) / tensors[-1])
    return fits


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _deepspeed_version() -> str:
    try:
        return version("deepspeed")
    except PackageNotFoundError:
        return "unknown"


def _matmul_rates(m: Measurement) -> tuple[dict, dict, float]:
    """(matmul FLOP/s per precision and width, their median over the widths per precision, copy bytes/s), each
    averaged over the compute ranks."""
    sizes, compute = m.sizes, m.results[: m.ranks]
    per_width = {p: {w: statistics.fmean(16 * sizes.tokens * w * w / r["matmul"][p][w] for r in compute)
                     for w in sizes.widths} for p in m.precisions}
    matmul = {p: statistics.median(rates.values()) for p, rates in per_width.items()}
    copy_bw = statistics.fmean(2 * sizes.copy_bytes / r["copy"] for r in compute)
    return per_width, matmul, copy_bw


def _fit_blocks(m: Measurement, matmul_per_width: dict[str, dict[int, float]]) -> dict:
    """The fused attention first (its cost per row and per score element), then the blocks less their attention,
    their FLOPs no faster than the fastest plain matmul measured (`matmul_per_width`, per precision): {"block_shapes",
    "block_works", "block_seconds", "block_fit", "attention_fit"} (fits per precision)."""
    sizes, compute = m.sizes, m.results[: m.ranks]
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
        # a block keeps at least a tenth of its time for its own work (a zero would leave nothing to fit). The FLOPs
        # and the elementwise work grow together over these shapes, so noise can trade time between them: the cap
        # keeps the FLOP rate a matmul rate, which is what the time model extrapolates to wide blocks
        overhead, rates = fit_rates([{k: w[k] for k in ("flops", "elementwise")} for w in block_works],
                                    [max(t - attention_seconds(w), 0.1 * t)
                                     for t, w in zip(block_times[p], block_works)],
                                    max_rates={"flops": max(matmul_per_width[p].values())})
        block_fit[p] = (overhead + calls, {**rates, **attention_rates})
    return {"block_shapes": shapes, "block_works": block_works, "block_seconds": block_times,
            "block_fit": block_fit, "attention_fit": attention_fit}


def _fit_links(m: Measurement) -> tuple[float, float, float | None, str]:
    """(collective latency, bus bandwidth, the ring fit's largest residual, a note for `source`): the all-reduce
    sweep fitted as a ring, or (one GPU: no collective ran) the link figures of the GPU's preset."""
    if m.world:
        counts = m.sizes.allreduce_bytes
        ar_times = [statistics.fmean(r["allreduce"][n] for r in m.results) for n in counts]
        latency, busbw, residual = fit_ring(list(counts), ar_times, m.world)
        backend = "nccl" if m.device == "cuda" else "gloo"
        note = (f"all-reduce ({backend}, {m.world} ranks, {counts[0] >> 10} KB .. {counts[-1] >> 20} MB) "
                f"fitted as a ring: {latency * 1e6:.0f} us + bytes / {_si(busbw, 'B/s')} bus bandwidth, "
                f"largest residual {residual:.0%}")
        if m.world > m.ranks:
            note += (f" (over {m.world} processes: ranks=1 runs no collective; the second process idled "
                     "during the compute measurements)")
        return latency, busbw, residual, note
    preset = gpu_preset(m.device_name, m.memory_bytes)
    if preset is None:
        raise ValueError(f"one {m.device_name}: no all-reduce to measure and no preset to take the link "
                         "figures from; calibrate with 2 GPUs or start from a preset profile")
    note = f"all-reduce NOT measured (one GPU): latency and intra-node bandwidth of the {preset.name} preset"
    return preset.collective_latency_s, preset.intra_node_bw, None, note


def _peaks(m: Measurement, matmul: dict, notes: list[str]) -> tuple[dict, str]:
    """(peak FLOP/s per precision: a GPU's datasheet figure, else the measured matmul rate; where the ranks ran);
    what is not a datasheet figure is added to `notes`."""
    if m.device == "cuda":
        peaks = {p: v for p in m.precisions if (v := peak_flops(m.device_name, p)) is not None}
        for p in m.precisions:
            if p not in peaks:
                peaks[p] = matmul[p]
                notes.append(f"no datasheet {p} peak for {m.device_name}: peak_flops[{p}] is the measured matmul rate")
        return peaks, f"{m.ranks} x {m.device_name} (of {m.gpus_per_node})"
    notes.append("a CPU has no datasheet peak: peak_flops is the measured matmul rate")
    return dict(matmul), f"{m.ranks} CPU rank(s) x {m.threads} thread(s) on {m.device_name} ({os.cpu_count()} CPUs)"


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} us"


def _fits_notes(m: Measurement, per_width: dict, block_fit: dict, engines: dict) -> tuple[str, str, str]:
    """The `source` notes of the matmul rates per width, the block fits and the engine fits."""
    rates = "; ".join(f"{p} " + ", ".join(f"{w}: {_si(r, 'FLOP/s')}" for w, r in per_width[p].items())
                      for p in m.precisions)

    def per(p: str, kind: str, unit: str = "/s") -> str:
        rate = block_fit[p][1].get(kind)
        return _si(rate, unit) if rate else "(no cost)"

    blocks_note = "; ".join(
        f"{p} {_us(block_fit[p][0])} + FLOPs / {per(p, 'flops', 'FLOP/s')} + elementwise elements / "
        f"{per(p, 'elementwise')} + attention rows / {per(p, 'attention_rows')} + attention-score elements / "
        f"{per(p, 'attention')}" for p in m.precisions)
    engines_note = "; ".join(
        f"ZeRO-{s} ({ENGINE_CONFIGS[s][0]}) micro-batch {_us(f.micro[0])} + {_us(f.micro[1])}/tensor (torch "
        f"{_us(f.baseline[1])}/tensor), step {_us(f.step[0])} + {_us(f.step[1])}/tensor = {_us(f.step_at_typical)} "
        f"at {TYPICAL_TENSORS}, per parameter {f.micro_param * 1e9:.2f} ns/micro-batch and {f.step_param * 1e9:.2f} "
        f"ns/step (optimizer partition)" for s, f in engines.items())
    return rates, blocks_note, engines_note


def _source(m: Measurement, where: str, fits_notes: tuple[str, str, str], allreduce_note: str,
            notes: list[str]) -> str:
    """The profile's `source`: where and how it was measured, and every fit in a few words."""
    sizes, k = m.sizes, m.sizes.engine_blocks
    rates, blocks_note, engines_note = fits_notes
    engine_where = (f"{m.processes} processes ({'nccl' if m.device == 'cuda' else 'gloo'})"
                    + (" (ranks=1: the engines ran over 2)" if m.processes > m.ranks else ""))
    return (
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
        f"elementwise elements / rate (relative least squares, coefficients >= 0, the FLOP rate at most the "
        f"fastest matmul's); per block: {blocks_note}. "
        f"DeepSpeed engines on {engine_where}: a toy of K x (Linear + LayerNorm) W {sizes.engine_width}, K "
        f"{', '.join(map(str, k))} ({', '.join(str(TENSORS_PER_BLOCK * b) for b in k)} tensors), micro-batch "
        f"{sizes.engine_micro_batch}, {sizes.engine_accum} micro-batches per step, median of {sizes.engine_steps} "
        f"steps after {sizes.engine_warmup_steps}, the slowest rank: {engines_note}; tensor overhead = micro-batch "
        f"slope - torch slope; per parameter: a W {sizes.engine_heavy_width} toy at K {sizes.engine_blocks[0]} "
        f"against the W {sizes.engine_width} one, beyond plain torch and the collectives the time model counts; "
        f"step overhead = the step at {TYPICAL_TENSORS} tensors less its per-parameter part. CPU ranks: "
        f"collectives overlap nothing (overlap 0). "
        f"memory_bw: a {sizes.copy_bytes >> 20} MB copy, read + write. {allreduce_note}. " + ". ".join(notes) + "."
    )


def build_profile(m: Measurement) -> tuple[DeviceProfile, dict]:
    """The DeviceProfile of a measurement, and the fits behind it (rates per width, block fits per precision,
    engine fits per ZeRO stage, the ring fit's residual) for tests and reports."""
    per_width, matmul, copy_bw = _matmul_rates(m)
    blocks = _fit_blocks(m, per_width)
    block_fit = blocks["block_fit"]
    latency, busbw, residual, allreduce_note = _fit_links(m)
    notes = ["inter-node bandwidth NOT measured (one host): set equal to the intra-node figure"]
    engines = _fit_engines(m, latency, busbw)
    peaks, where = _peaks(m, matmul, notes)
    source = _source(m, where, _fits_notes(m, per_width, block_fit, engines), allreduce_note, notes)
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
    fits = {"matmul_per_width": per_width, **blocks, "engines": engines, "allreduce_residual": residual}
    return profile, fits
