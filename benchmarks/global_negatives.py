"""What `loss.negatives: global` costs: step time and peak memory against `micro` at several accumulations, on CPU
ranks of this machine, beside the planner's prediction; and the planner's coca_giant on 512 A100-80GB with the
paper's 65,535 negatives.

    python benchmarks/global_negatives.py                      # 2 ranks, accumulation 1, 4 and 16 (~10 min)
    python benchmarks/global_negatives.py --accum 1 4 --ranks 2 --steps 4
    python benchmarks/global_negatives.py --giant-only         # the planner's table alone (seconds)

Each (accumulation, negatives) pair trains the benchmark CoCa (below) on gloo CPU ranks under DP ZeRO-1 bf16 with
the same global batch per micro-batch count; the time is the median of the timed steps after a warm-up
(megacoca.profiling.measure), the memory the tracked step's peak over every rank. The expected cost of `global` is
about one extra forward of both towers per step (the first pass), plus the global loss.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megacoca.config.flavors import get_flavor  # noqa: E402
from megacoca.config.layout import Layout  # noqa: E402
from megacoca.config.model import CoCaConfig  # noqa: E402
from megacoca.plan.memory import ZeroBuffers, predict  # noqa: E402
from megacoca.plan.presets import get_profile  # noqa: E402
from megacoca.plan.search import plan  # noqa: E402
from megacoca.profiling.measure import measure_layout  # noqa: E402

CFG = CoCaConfig(image_size=64, patch_size=8, vision_width=128, vision_layers=4, vision_heads=4, vision_mlp_dim=512,
                 caption_queries=32, pooler_heads=4, vocab_size=2000, context_length=24, text_width=128,
                 text_heads=4, text_mlp_dim=512, text_layers=2, decoder_layers=2, embed_dim=128, kernels="torch")
MICRO = 8


def measure(ranks: int, accum: int, negatives: str, steps: int) -> dict:
    overrides = ["parallel.deepspeed_config=zero1_bf16", f"schedule.micro_batch_size={MICRO}",
                 f"schedule.global_batch_size={MICRO * ranks * accum}", f"loss.negatives={negatives}"]
    per_rank = measure_layout(overrides, ranks, CFG, steps=steps)
    layout = Layout(dp=ranks, zero_stage=1, micro_batch=MICRO, grad_accum=accum, negatives=negatives)
    return {"step_s": max(r["step_time_s"] for r in per_rank), "peak_mb": max(r["peak_bytes"] for r in per_rank) / 1e6,
            "predicted_peak_mb": predict(CFG, layout, ZeroBuffers())[0].peak / 1e6}


def cpu_table(args) -> None:
    print(f"benchmark CoCa on {args.ranks} CPU ranks, DP ZeRO-1 bf16, micro-batch {MICRO} per rank "
          f"({CFG.vision_layers} ViT blocks at {CFG.image_size}px, {CFG.text_layers}+{CFG.decoder_layers} text)")
    print("| accumulation | negatives per image | micro: s/step | global: s/step | time ratio | micro: peak MB | "
          "global: peak MB | predicted peak MB (micro / global) |")
    print("|---|---|---|---|---|---|---|---|")
    for accum in args.accum:
        micro = measure(args.ranks, accum, "micro", args.steps)
        global_ = measure(args.ranks, accum, "global", args.steps)
        negatives = f"{MICRO * args.ranks - 1} -> {MICRO * args.ranks * accum - 1}"
        print(f"| {accum} | {negatives} | {micro['step_s']:.3f} | {global_['step_s']:.3f} | "
              f"{global_['step_s'] / micro['step_s']:.2f}x | {micro['peak_mb']:.1f} | {global_['peak_mb']:.1f} | "
              f"{micro['predicted_peak_mb']:.1f} / {global_['predicted_peak_mb']:.1f} |", flush=True)


def giant_table() -> None:
    cfg, profile = get_flavor("coca_giant"), get_profile("a100-80gb")
    print("coca_giant on 512 A100-80GB (preset, not calibrated), global batch 65,536, bf16, Triton kernels:")
    print("| negatives | best layout | negatives per image | samples/s | /GPU | MFU | global negatives' share |")
    print("|---|---|---|---|---|---|---|")
    for negatives in ("micro", "global"):
        plans, _ = plan(cfg, profile, 512, 65_536, "bf16", kernels="triton", negatives=negatives)
        best = plans[0]
        share = best.time.parts.get("global negatives' first pass and loss", 0.0) / best.time.seconds
        print(f"| {negatives} | {best.layout.describe()} | {best.negatives:,} | {best.time.samples_per_s:,.0f} | "
              f"{best.time.samples_per_s_per_gpu:.1f} | {100 * best.time.mfu:.1f}% | {100 * share:.0f}% |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--accum", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--steps", type=int, default=4, help="steps per measurement (the first is a warm-up)")
    parser.add_argument("--giant-only", action="store_true", help="print the planner's coca_giant table only")
    args = parser.parse_args()
    giant_table()
    if not args.giant_only:
        print()
        cpu_table(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
