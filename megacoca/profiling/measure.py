"""Measured memory per rank and step time of a layout on gloo CPU ranks: what the planner's predictions are held to.

`measure_step(trainer)` times untracked steps of a megacoca Trainer, then tracks one more with
megacoca.profiling.memory_tracker.MemoryTracker (its docstring defines the categories); `measure_layout` forks the
gloo ranks of a layout (megacoca.launch.ranks) and measures each, on `MeasureLoader`'s deterministic batches.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from megacoca.config.recipes import build_config
from megacoca.launch.ranks import run_ranks
from megacoca.parallel.dims import ParallelDims
from megacoca.profiling.memory_tracker import MemoryTracker
from megacoca.trainer import Trainer

# what the ranks' forkserver imports once (megacoca.launch.ranks): a rank's fork then starts in well under a second
PRELOAD = ["torch", "torch.distributed", "deepspeed", "megacoca.trainer", "megacoca.models.coca", "megacoca.losses",
           "deepspeed.runtime.zero.stage3", "deepspeed.runtime.zero.stage_1_and_2"]


@contextlib.contextmanager
def _phases(engine, tracker: MemoryTracker):
    """`tracker.phase` is "backward" inside engine.backward and "step" inside engine.step (instance attributes
    shadow the methods for the duration; a pipeline runner calls the same engine)."""

    def wrap(method, phase):
        def wrapped(*args, **kwargs):
            previous, tracker.phase = tracker.phase, phase
            tracker.scan_at_next_grad = phase == "backward"
            try:
                return method(*args, **kwargs)
            finally:
                tracker.phase = previous
                tracker.scan()

        return wrapped

    engine.backward = wrap(engine.backward, "backward")
    engine.step = wrap(engine.step, "step")
    try:
        yield
    finally:
        del engine.backward, engine.step



def measure_step(trainer, steps: int = 2) -> dict:
    """Run `steps` untracked training steps of `trainer` (the first a warm-up, excluded from the time), then one
    tracked step. Returns this rank's {"peak_bytes", "peak_by_category", "peak_phase", "steady_bytes" (by category
    after the tracked step), "step_time_s" (median of the untracked steps after the first), "step_times_s",
    "tracked_step_s"}."""
    if steps < 2:
        raise ValueError(f"measure_step: steps must be >= 2 (a warm-up and a timed step), got {steps}")
    batches = iter(trainer.train_loader)
    times = []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        trainer.train_step(batches)
        times.append(time.perf_counter() - start)
    dist.barrier()
    tracker = MemoryTracker(trainer.device)
    tracker.watch_module(trainer.engine.module)
    tracker.watch_optimizer(trainer.engine.optimizer)
    start = time.perf_counter()
    with tracker, _phases(trainer.engine, tracker):
        tracker.phase = "forward"
        trainer.train_step(batches)
        tracker.phase = None
        tracker.scan()
        steady = tracker.breakdown()
    tracked = time.perf_counter() - start
    return {"peak_bytes": tracker.peak_bytes, "peak_by_category": tracker.breakdown(peak=True),
            "peak_phase": tracker.peak_phase, "steady_bytes": steady,
            "step_time_s": statistics.median(times[1:]), "step_times_s": times, "tracked_step_s": tracked}



class MeasureLoader:
    """Endless deterministic batches for a measurement: random images and token ids with every text position real
    (bos ... eos, no padding: the activation sizes a planner assumes). Batch k of dp rank r is seeded by
    k * dp + r, so the dp ranks see different samples."""

    def __init__(self, batch_size: int, dp_rank: int, dp_size: int, cfg, seed: int = 0):
        self.batch_size, self.dp_rank, self.dp_size, self.cfg, self.seed = batch_size, dp_rank, dp_size, cfg, seed
        self.position = 0
        self.skipped = {"decode": 0}

    def __iter__(self):
        while True:
            self.position += 1
            yield self._batch((self.position - 1) * self.dp_size + self.dp_rank)  # no local keeps it alive

    def _batch(self, index: int) -> dict:
        cfg, size = self.cfg, self.batch_size
        gen = torch.Generator().manual_seed(self.seed + index)
        images = torch.randn(size, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)
        text = torch.randint(3, cfg.vocab_size, (size, cfg.context_length), generator=gen)
        text[:, 0], text[:, -1] = 1, 2  # bos, eos
        return {"images": images, "text": text, "keys": [f"{index}/{i}" for i in range(size)]}

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]



def build_measured_trainer(overrides: list[str], world_size: int, model_cfg, run_dir: str):
    """A Trainer over the initialised process group for the job of `build_config(overrides=...)` training
    `model_cfg` (a CoCaConfig) on MeasureLoader batches; tensorboard and the final save are off and logs go to
    `run_dir` unless `overrides` say otherwise."""
    quiet = ["logging.tensorboard=false", "checkpoint.save_final=false", f"logging.run_dir={run_dir}"]
    job = build_config(overrides=[*quiet, *overrides])
    job.model.overrides = model_cfg.to_dict()
    dims = ParallelDims.from_config(job.parallel, world_size).build()
    loader = MeasureLoader(job.schedule.micro_batch_size, dims.dp_rank, dims.dp_size, job.model_config(),
                           seed=job.seed)
    return Trainer(job, loader, dims=dims)



def _measure_rank(rank: int, world_size: int, overrides: list[str], model_cfg, steps: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="megacoca_measure_") as run_dir:
        trainer = build_measured_trainer(overrides, world_size, model_cfg, run_dir)
        try:
            result = measure_step(trainer, steps)
        finally:
            trainer.close()
    dims = trainer.dims
    return {"rank": rank, "dp_rank": dims.dp_rank, "pp_rank": dims.pp_rank, "tp_rank": dims.tp_rank, **result}



# A GPU's caching allocator keeps a freed block for the next step; glibc on a CPU rank returns every block above its
# mmap threshold (up to 32 MB) to the OS on free, so each step page-faults its large activations in again: measured
# on the planner's "small" model, DP=2 ZeRO-3 fp32 ran a step in 0.592 s as is and 0.445 s with these settings (ZeRO-0
# fp32 0.335 -> 0.300 s), a cost the time model, written for GPUs, does not have. Measurements for the planner
# (measure_layout, megacoca.profiling.calibrate) run their ranks with it switched off: allocations from the heap, and
# the heap never trimmed (memory kept for reuse, as a caching allocator keeps it). Live-tensor memory is unchanged.
CACHING_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}


def emulate_caching_allocator() -> None:
    """Set CACHING_MALLOC in this process's environment (values already set are kept). glibc reads it when a process
    starts: call it before the first `run_ranks` of the process starts the forkserver the ranks fork from."""
    for key, value in CACHING_MALLOC.items():
        os.environ.setdefault(key, value)


def measure_layout(overrides: list[str], world_size: int, model_cfg, steps: int = 2,
                   timeout: float = 600) -> list[dict]:
    """Measure one layout on `world_size` gloo CPU ranks of this machine: the job of `build_config(overrides=...)`
    training `model_cfg` (a CoCaConfig) on MeasureLoader batches, as build_measured_trainer builds it. Returns
    measure_step's dict of every rank, in rank order, with its rank and (dp, pp, tp) coordinates. The ranks run with
    glibc's heap as a caching allocator (`emulate_caching_allocator`) when this is the process's first run_ranks."""
    emulate_caching_allocator()
    return run_ranks(_measure_rank, world_size, list(overrides), model_cfg, steps, timeout=timeout, preload=PRELOAD,
                     grace=1.0)

