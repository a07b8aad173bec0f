"""`megacoca plan --calibrate`: measure this machine's DeviceProfile (issue 11, "Calibration").

`calibrate(ranks)` forks `ranks` processes (2 when ranks == 1, for the collectives; megacoca.launch.ranks: from a
forkserver that imported torch, and on a CPU DeepSpeed, once; FileStore rendezvous, no ports), each a CPU rank
with `threads` threads (gloo) or one GPU (nccl), and measures what the planner's time model (megacoca.plan.timing)
divides by, every rank at the same time, so that the figures describe one rank among `ranks` co-located ones (on a
CPU they share its cores): megacoca.profiling.calibrate_rank is what a rank runs, `measure` collects it into a
megacoca.plan.fit.Measurement, and megacoca.plan.fit.build_profile (whose docstring says what each figure is and
how it is fitted) makes the profile. With 2 or more ranks, `calibrate_trainer` then runs real Trainer steps
(megacoca.profiling.measure) for what the Trainer costs beyond the engine and the blocks.

`quick=True` shrinks every size and repetition count so that the whole run takes seconds (tests).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time

import torch

from megacoca.config.flavors import get_flavor
from megacoca.config.layout import Layout
from megacoca.launch.ranks import run_ranks
from megacoca.plan.comm import analytic_comm
from megacoca.plan.fit import Measurement, Sizes, build_profile, engine_stage
from megacoca.plan.least_squares import fit_residuals
from megacoca.plan.memory import default_text_ahead
from megacoca.plan.profile import DeviceProfile
from megacoca.plan.timing import predict_time
from megacoca.profiling.calibrate_rank import rank_main
from megacoca.profiling.measure import emulate_caching_allocator, measure_layout

DTYPES = ("fp32", "bf16", "fp16")
ALWAYS = ("fp32", "bf16")  # measured by every calibration, whatever precision it is asked for
# the forkserver imports these once (a rank's fork then starts in well under a second)
PRELOAD = ["torch", "torch.distributed", "megacoca.models.coca.layers"]
# and on a CPU DeepSpeed too (its optimizer check imports its Muon optimizer, whose module calls torch.compile at
# import: inductor, seconds on a small CPU). Not with GPUs: importing DeepSpeed picks its accelerator with
# torch.cuda.is_available(), which initialises the CUDA driver, and a process forked after that cannot use CUDA
PRELOAD_CPU = [*PRELOAD, "torch._dynamo", "deepspeed", "deepspeed.runtime.zero.muon.muon_optimizer",
               "deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.zero.stage3"]
# The trainer calibration's model: coca_tiny cut to 2 ViT blocks, 1 text block and 1 decoder layer (the planner's
# validation models are others: benchmarks/plan_measure.py).
TRAINER_CALIBRATION = {"flavor": "coca_tiny", "vision_layers": 2, "text_layers": 1, "decoder_layers": 1,
                       "kernels": "torch"}
_SHARD_ALL = "parallel.deepspeed_overrides.zero_optimization.stage3_param_persistence_threshold=0"
# keyed as megacoca.plan.fit.ENGINE_CONFIGS: every ZeRO stage in the precision megacoca ships it with, and ZeRO-3 in
# fp32 on its own ("3/fp32")
_TRAINER_CONFIGS = {0: ("zero0_fp32", []), 1: ("zero1_bf16", []), 2: ("zero2_bf16", []),
                    3: ("zero3_bf16", [_SHARD_ALL]), "3/fp32": ("zero3_fp32", [_SHARD_ALL])}


def sizes_for(device: str, quick: bool) -> Sizes:
    """What a calibration on `device` ("cpu" or "cuda") runs: the full sizes, or seconds' worth (`quick`)."""
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


def measure(ranks: int = 1, precision: str = "fp32", device: str | None = None, quick: bool = False, *,
            threads: int | None = None, timeout: float = 900) -> Measurement:
    """Run the measurements on `ranks` co-located ranks (see the module docstring); fp32 and bf16 are measured
    whatever `precision` says (fp16 as well when it is asked for)."""
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
        emulate_caching_allocator()  # as the layouts it predicts are measured (megacoca.profiling.measure)
    sizes = sizes_for(device, quick)
    precisions = measured_precisions(precision)
    started = time.perf_counter()
    results = run_ranks(rank_main, world, ranks, device, precisions, sizes, threads, world >= 2, timeout=timeout,
                        init=False, preload=PRELOAD_CPU if device == "cpu" else PRELOAD, what="calibration failed on ",
                        grace=1.0)
    return Measurement(ranks, world if world >= 2 else 0, world, precisions, device, device_name, memory_bytes,
                       gpus_per_node, threads, quick, sizes, results, time.perf_counter() - started)


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


def _trainer_residual(cfg, profile: DeviceProfile, ranks: int, key: int | str, b: int, accum: int, timeout: float,
                      tp: int = 1, pp: int = 1, extra: tuple = ()) -> float:
    """Seconds of a real Trainer step of `cfg` (the slowest rank's median, megacoca.profiling.measure) beyond the
    time model's prediction with `profile`, under _TRAINER_CONFIGS[key] (a ZeRO stage, or "3/fp32"), micro-batch `b`
    x `accum`, tp x pp x the rest dp."""
    dp = ranks // (tp * pp)
    ds = _TRAINER_CONFIGS[key][0]
    zero = engine_stage(key)
    overrides = [f"parallel.deepspeed_config={ds}", f"schedule.micro_batch_size={b}", f"parallel.tp={tp}",
                 f"parallel.pp={pp}", f"schedule.global_batch_size={b * dp * accum}", *extra]
    measured = max(rank["step_time_s"] for rank in measure_layout(overrides, ranks, cfg, steps=6, timeout=timeout))
    layout = Layout(tp=tp, pp=pp, dp=dp, zero_stage=zero, micro_batch=b, grad_accum=accum,
                    precision="fp32" if "fp32" in ds else "bf16", text_ahead=default_text_ahead(cfg, pp, accum, zero))
    return measured - predict_time(cfg, layout, profile).seconds


def _trainer_zero_overheads(cfg, profile: DeviceProfile, ranks: int, micro_batch: int, timeout: float,
                            notes: list[str]) -> DeviceProfile:
    """`profile` with the Trainer's per-step, per-micro-batch and per-sample costs of every ZeRO stage added."""
    step, micro, samples = dict(profile.step_overhead_s), dict(profile.micro_overhead_s), []
    for zero, (_, extra) in _TRAINER_CONFIGS.items():
        points = {(b, a): _trainer_residual(cfg, profile, ranks, zero, b, a, timeout, extra=tuple(extra))
                  for b, a in ((micro_batch, 1), (micro_batch, 3), (2 * micro_batch, 1))}
        per_step, per_micro, per_sample = fit_residuals(points)
        # the residual is on top of the engine's own cost under the same key (for "3/fp32": the fp32 engine's)
        step[str(zero)] = step.get(str(zero), 0.0) + per_step
        micro[str(zero)] = micro.get(str(zero), 0.0) + per_micro
        samples.append(per_sample)
        notes.append(f"ZeRO-{zero} +{per_step * 1e3:.1f} ms/step +{per_micro * 1e3:.1f} ms/micro-batch "
                     f"(+{per_sample * 1e3:.2f} ms/sample)")
    return dataclasses.replace(profile, step_overhead_s=step, micro_overhead_s=micro,
                               sample_overhead_s=statistics.median(samples))


def _trainer_parallel_overheads(cfg, profile: DeviceProfile, ranks: int, micro_batch: int, timeout: float,
                                notes: list[str]) -> dict:
    """{"tp": seconds per tensor-parallel collective call, "pp": seconds per micro-batch of the runner} (an odd
    `ranks` measures neither)."""
    parallel = {}
    for kind, degree in (("tp", {"tp": 2}), ("pp", {"pp": 2})):
        if ranks % 2:
            continue
        accums = (2, 4) if kind == "pp" else (1, 3)
        low, high = (_trainer_residual(cfg, profile, ranks, 1, micro_batch, a, timeout, **degree) for a in accums)
        per_micro = (high - low) / (accums[1] - accums[0])
        if kind == "tp":  # per tensor-parallel collective call: it transfers to models with other layer counts
            calls = sum(term["calls"] for term in analytic_comm(cfg, micro_batch, 2, False))
            parallel[kind] = max(per_micro, 0.0) / calls
            notes.append(f"tp 2 +{parallel[kind] * 1e6:.0f} us per tensor-parallel collective")
        else:  # floored like the others: a negative residual here is mostly noise (measured: crediting it put
            # held-out pipelines at 0.6 of their time)
            parallel[kind] = max(per_micro, 0.0)
            notes.append(f"pp 2 +{parallel[kind] * 1e3:.1f} ms/micro-batch (fitted {per_micro * 1e3:+.1f})")
    return parallel


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
    choice = dict(TRAINER_CALIBRATION)
    cfg = get_flavor(choice.pop("flavor"), **choice)
    notes: list[str] = []
    profile = _trainer_zero_overheads(cfg, profile, ranks, micro_batch, timeout, notes)
    parallel = _trainer_parallel_overheads(cfg, profile, ranks, micro_batch, timeout, notes)
    source = (profile.source + f"; the Trainer beyond the engine (real steps of coca_tiny cut to "
              f"{cfg.vision_layers}/{cfg.text_layers}/{cfg.decoder_layers} layers, minus the time model): "
              + ", ".join(notes))
    return dataclasses.replace(profile, parallel_overhead_s=parallel, source=source)
