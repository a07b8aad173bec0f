"""The planner's GPU presets against published CLIP / CoCa training runs (benchmarks/published_runs.py: the runs,
their sources, their models as CoCaConfigs and the layouts their software ran). Prints tables; not a test
(tests/unit/plan/test_presets.py holds the calibration point).

    .venv/bin/python benchmarks/plan_published.py                         # the presets as shipped
    .venv/bin/python benchmarks/plan_published.py --matmul-efficiency 0.7  # every preset's matmul rate at 0.7 of peak

1. Each model's training FLOPs per sample by megacoca's count (megacoca.metrics.flops) against 3 x open_clip's
   published forward GFLOPs: what the CLIP-shaped CoCa adds (its minimal captioning side).
2. Each run: published samples/s per GPU and MFU; the preset's prediction for the run's own layout (pinned: pure data
   parallelism, ZeRO-1 bf16, its per-GPU batch in one micro-batch, its recompute; megacoca.plan.memory.predict and
   megacoca.plan.timing.predict_time) and for the best layout the planner finds for the same GPUs and global batch
   (megacoca.plan.search.plan); ratios predicted / published. MFU throughout by the published convention (3 x open_clip
   forward GFLOPs over the dense bf16 peak), so the ratios of samples/s and of MFU agree.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from published_runs import FLAVORS, OPEN_CLIP_GFLOPS, RUNS, PublishedRun, train_flops  # noqa: E402

from megacoca.metrics.flops import train_flops_per_sample  # noqa: E402
from megacoca.plan.memory import predict  # noqa: E402
from megacoca.plan.presets import get_profile  # noqa: E402
from megacoca.plan.profile import DeviceProfile  # noqa: E402
from megacoca.plan.search import plan  # noqa: E402
from megacoca.plan.timing import predict_time  # noqa: E402


def run_profile(run: PublishedRun, matmul_efficiency: float | None = None) -> DeviceProfile:
    """The run's preset with its nodes' GPU count (JUWELS Booster: 4), its matmul rate optionally replaced."""
    profile = get_profile(run.cluster).with_nodes(run.gpus_per_node)
    if matmul_efficiency is not None:
        profile = replace(profile, matmul_flops={k: v * matmul_efficiency for k, v in profile.peak_flops.items()})
    return profile


def pinned(run: PublishedRun, profile: DeviceProfile) -> tuple[float, float, dict]:
    """(samples/s per GPU, peak GB per GPU, the step's parts in seconds) of the run's own layout."""
    cfg, layout = FLAVORS[run.model], run.layout()
    peak = max(stage.peak for stage in predict(cfg, layout, None)) / 1e9
    time = predict_time(cfg, layout, profile)
    return time.samples_per_s_per_gpu, peak, {**time.parts, "step": time.seconds}


def mfu(run: PublishedRun, per_gpu: float, profile: DeviceProfile) -> float:
    return per_gpu * train_flops(run) / profile.peak_flops["bf16"]


def flops_table() -> None:
    print("| model | megacoca train GFLOP/sample | 3 x open_clip forward GFLOP | excess |")
    print("|---|---|---|---|")
    for name, cfg in FLAVORS.items():
        ours, theirs = train_flops_per_sample(cfg) / 1e9, 3 * OPEN_CLIP_GFLOPS[name]
        print(f"| {name} | {ours:,.1f} | {theirs:,.1f} | {100 * (ours / theirs - 1):+.1f}% |")


def runs_table(matmul_efficiency: float | None) -> None:
    header = ["run", "GPUs", "per-GPU batch", "published /GPU", "MFU", "pinned /GPU", "MFU", "ratio", "pinned GB",
              "pinned: beyond compute", "best /GPU", "MFU", "ratio", "best layout"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for run in RUNS:
        profile = run_profile(run, matmul_efficiency)
        per_gpu, peak_gb, parts = pinned(run, profile)
        fits = peak_gb <= 0.9 * profile.memory_bytes / 1e9
        others = {k: v for k, v in parts.items() if k != "step" and not k.startswith("compute") and v > 0}
        limit = ", ".join(f"{k} {100 * v / parts['step']:.0f}%" for k, v in others.items()) or "-"
        plans, _ = plan(FLAVORS[run.model], profile, run.gpus, run.global_batch)
        best = plans[0]
        best_gpu = best.time.samples_per_s_per_gpu
        print(f"| {run.name} | {run.gpus:,} | {run.per_gpu_batch}{' ckpt' if run.checkpointing else ''} | "
              f"{run.per_gpu:.1f} | {100 * mfu(run, run.per_gpu, profile):.1f}% | "
              f"{per_gpu:.1f} | {100 * mfu(run, per_gpu, profile):.1f}% | {per_gpu / run.per_gpu:.2f} | "
              f"{peak_gb:.1f}{'' if fits else ' (too big)'} | {limit} | "
              f"{best_gpu:.1f} | {100 * mfu(run, best_gpu, profile):.1f}% | {best_gpu / run.per_gpu:.2f} | "
              f"{best.layout.describe()}{' *' if best_gpu < per_gpu else ''} |")
    print("\n* slower than the run's own layout: the search's best among the layouts it tries that fit in 90% of the "
          "memory (the run's own may not fit there, or its text-ahead and ZeRO stage differ)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--matmul-efficiency", type=float, default=None, metavar="X",
                        help="replace every preset's matmul rate by X x its dense peak (default: the presets')")
    args = parser.parse_args()
    flops_table()
    print()
    profiles = {run.cluster: run_profile(run, args.matmul_efficiency) for run in RUNS}
    for name, profile in profiles.items():
        print(f"- {name}: {profile.source}" + (f" (matmul rate replaced: {args.matmul_efficiency} x peak)"
                                                if args.matmul_efficiency is not None else ""))
    print()
    runs_table(args.matmul_efficiency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
