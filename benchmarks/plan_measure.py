"""Measured memory per rank and step time of parallel layouts on gloo CPU ranks, for the planner to be held to.

Each layout runs on --world ranks of this machine (forked, FileStore rendezvous) through megacoca's own Trainer
with the shipped DeepSpeed configs, and megacoca.profiling.measure reports per rank: the peak of live tensor bytes
over one training step with its breakdown (params, grads, optimizer, activations, temp, other; defined in that
module's docstring), the bytes held between steps, and the median step time of untracked steps. Not a test.

    .venv/bin/python benchmarks/plan_measure.py                          # every layout, both models
    .venv/bin/python benchmarks/plan_measure.py --model tiny --layout dp2_zero1_bf16 --json /tmp/m.json
    .venv/bin/python benchmarks/plan_measure.py --model small \
        --set parallel.deepspeed_overrides.zero_optimization.reduce_bucket_size=1000000
    .venv/bin/python benchmarks/plan_measure.py --sealed benchmarks/plan_sealed/2026-12-05.json --json /tmp/sealed.json

--sealed FILE measures a sealed held-out set (benchmarks/plan_sealed/: its own models and layouts, committed before
the model changes it judges; measure it once). Every row of the JSON carries its model's config and the
`megacoca plan --layout` command that predicts it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megacoca.config.flavors import get_flavor  # noqa: E402
from megacoca.profiling.measure import measure_layout  # noqa: E402
from megacoca.profiling.memory_tracker import CATEGORIES  # noqa: E402

# coca_tiny, and a model with more image tokens and layers so that activations weigh next to the model states;
# both with the torch kernels (no Triton interpreter on CPU).
MODELS = {
    "tiny": get_flavor("coca_tiny", kernels="torch"),
    "small": get_flavor("coca_tiny", image_size=128, patch_size=16, vision_width=256, vision_layers=4,
                        vision_heads=4, vision_mlp_dim=1024, caption_queries=64, text_width=256, text_heads=4,
                        text_mlp_dim=1024, text_layers=2, decoder_layers=2, embed_dim=256, vocab_size=4096,
                        context_length=32, pooler_heads=4, kernels="torch"),
}
# ZeRO-3 keeps tensors under stage3_param_persistence_threshold (1e5 elements) whole on every rank, i.e. all of
# a small model's: 0 shards them all, as a large model's are.
SHARD_ALL = "parallel.deepspeed_overrides.zero_optimization.stage3_param_persistence_threshold=0"
AC = "parallel.activation_checkpointing=true"


def _layout(ds: str, micro: int = 8, dp: int = 2, tp: int = 1, pp: int = 1, *extra: str) -> list[str]:
    accum = 2 if pp > 1 else 1  # 1F1B needs at least pp micro-batches
    return [f"parallel.deepspeed_config={ds}", f"parallel.tp={tp}", f"parallel.pp={pp}",
            f"schedule.global_batch_size={micro * dp * accum}", f"schedule.micro_batch_size={micro}", *extra]


# name -> (world size, overrides); micro-batch 8 per rank unless the name says otherwise
LAYOUTS = {
    "dp2_zero0_fp32": (2, _layout("zero0_fp32")),
    "dp2_zero1_bf16": (2, _layout("zero1_bf16")),
    "dp2_zero3_bf16": (2, _layout("zero3_bf16", 8, 2, 1, 1, SHARD_ALL)),
    "tp2_zero1_bf16": (2, _layout("zero1_bf16", 8, 1, 2)),
    "pp2_zero1_bf16": (2, _layout("zero1_bf16", 8, 1, 1, 2)),
    "dp2_zero3_bf16_ac": (2, _layout("zero3_bf16", 8, 2, 1, 1, SHARD_ALL, AC)),
    "dp2_zero3_bf16_ac_mb4": (2, _layout("zero3_bf16", 4, 2, 1, 1, SHARD_ALL, AC)),
    "dp2_zero3_bf16_ac_mb16": (2, _layout("zero3_bf16", 16, 2, 1, 1, SHARD_ALL, AC)),
    "dp2_zero3_bf16_mb16": (2, _layout("zero3_bf16", 16, 2, 1, 1, SHARD_ALL)),
}

# Layouts the planner's memory model was NOT fitted to (docs/benchmarks.md reports both sets): ZeRO-2, accumulation,
# TP and PP under ZeRO-3, four ranks, a small reduce bucket, PP with recompute.
HOLDOUT = {
    "dp2_zero2_bf16": (2, _layout("zero2_bf16")),
    "dp2_zero1_bf16_mb4_accum4": (2, [*_layout("zero1_bf16", 4), "schedule.global_batch_size=32"]),
    "tp2_zero3_bf16": (2, _layout("zero3_bf16", 8, 1, 2, 1, SHARD_ALL)),
    "pp2_zero3_bf16_accum4": (2, [*_layout("zero3_bf16", 4, 1, 1, 2, SHARD_ALL), "schedule.global_batch_size=16"]),
    "dp4_zero3_bf16": (4, _layout("zero3_bf16", 8, 4, 1, 1, SHARD_ALL)),
    "dp4_zero1_bf16": (4, _layout("zero1_bf16", 8, 4)),
    "dp2_zero1_bf16_bucket1e6": (2, _layout("zero1_bf16", 8, 2, 1, 1,
                                            "parallel.deepspeed_overrides.zero_optimization.reduce_bucket_size=1000000")),
    "pp2_zero1_bf16_ac": (2, _layout("zero1_bf16", 8, 1, 1, 2, AC)),
}
# Measured once, after the memory model was final (docs/benchmarks.md): nothing was changed after seeing them.
FRESH = {
    "tp2_pp2_zero1_bf16": (4, _layout("zero1_bf16", 4, 1, 2, 2)),
    "dp4_zero2_bf16": (4, _layout("zero2_bf16", 8, 4)),
    "dp2_zero3_fp32": (2, _layout("zero3_fp32", 8, 2, 1, 1, SHARD_ALL)),
    "dp2_zero1_bf16_mb16_accum2": (2, [*_layout("zero1_bf16", 16), "schedule.global_batch_size=64"]),
    "pp2_zero1_bf16_accum4_ac": (2, [*_layout("zero1_bf16", 4, 1, 1, 2, AC), "schedule.global_batch_size=16"]),
}
MODELS["open_clip_odd"] = get_flavor("coca_tiny", pooler_layout="open_clip", decoder_mlp_after_self_attn=True,
                                     vision_heads=2, text_heads=2, pooler_heads=2, vision_width=96, text_width=96,
                                     embed_dim=96, vision_mlp_dim=288, text_mlp_dim=352, caption_queries=17,
                                     vocab_size=3001, context_length=40, image_size=96, patch_size=12,
                                     kernels="torch")
MODELS["long_text"] = get_flavor("coca_tiny", context_length=64, vocab_size=8192, text_layers=3, decoder_layers=3,
                                 kernels="torch")


def load_sealed(path: str) -> tuple[dict, dict, list[tuple[str, str]]]:
    """A sealed set's (models as CoCaConfigs, layouts as {name: (world, overrides)}, the (model, layout) runs)."""
    with open(path) as f:
        sealed = json.load(f)
    models = {name: get_flavor("coca_tiny", **fields) for name, fields in sealed["models"].items()}
    layouts = {name: (int(world), list(overrides)) for name, (world, overrides) in sealed["layouts"].items()}
    runs = [(model, name) for model, names in sealed["runs"].items()
            for name in (layouts if names == "all" else names)]
    return models, layouts, runs


def plan_command(model_cfg, world: int, overrides: list[str]) -> str:
    """The `megacoca plan --layout` command line that predicts this measured layout (the model as --set fields on
    coca_tiny, the DeepSpeed config and its overrides as given)."""
    from megacoca.config.recipes import build_config

    job = build_config(overrides=overrides)
    p, tiny = job.parallel, get_flavor("coca_tiny").to_dict()
    dp = world // (p.tp * p.pp)
    layout = (f"tp={p.tp},pp={p.pp},dp={dp},micro={job.schedule.micro_batch_size},accum={job.grad_accum_steps(dp)},"
              f"ckpt={'on' if p.activation_checkpointing else 'off'},"
              f"keep_gathered={'on' if p.pipeline_keep_gathered else 'off'}"
              # CPU ranks: the text tower overlaps only in a thread, when asked (megacoca.parallel.overlap)
              + (f",overlap={'on' if p.overlap_text_tower == 'thread' else 'off'}" if p.pp == 1 else ""))
    words = ["megacoca plan --flavor coca_tiny", f"--layout {layout}", f"--deepspeed-config {p.deepspeed_config}"]
    words += [f"--deepspeed-set {key}={value}" for key, value in sorted(p.deepspeed_overrides.items())]
    words += [f"--set {key}={json.dumps(value)}" for key, value in model_cfg.to_dict().items()
              if tiny.get(key) != value and key != "kernels"]
    return " ".join([*words, "--kernels torch"])


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f}"


def _table(rows: list[dict]) -> str:
    head = ["model", "layout", "rank (dp,pp,tp)", "peak MB", *(f"{c} MB" for c in CATEGORIES), "peak in",
            "between steps MB", "step s", "tracked step s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        for r in row["ranks"]:
            cells = [row["model"], row["layout"], f"{r['rank']} ({r['dp_rank']},{r['pp_rank']},{r['tp_rank']})",
                     _mb(r["peak_bytes"]), *(_mb(r["peak_by_category"][c]) for c in CATEGORIES), r["peak_phase"],
                     _mb(sum(r["steady_bytes"].values())), f"{r['step_time_s']:.3f}", f"{r['tracked_step_s']:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["tiny", "small"], choices=list(MODELS))
    parser.add_argument("--layout", nargs="+", default=None, choices=[*LAYOUTS, *HOLDOUT, *FRESH],
                        help="default: the fitted set (or the held-out one with --holdout)")
    parser.add_argument("--holdout", action="store_true", help="the layouts the memory model was not fitted to")
    parser.add_argument("--fresh", action="store_true", help="the layouts measured once the model was final")
    parser.add_argument("--sealed", metavar="FILE", default=None,
                        help="a sealed held-out set (benchmarks/plan_sealed/*.json): its models and layouts")
    parser.add_argument("--steps", type=int, default=4, help="untracked steps: a warm-up, then the timed ones")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every layout (repeatable)")
    parser.add_argument("--json", metavar="PATH", help="also write every rank's numbers as JSON")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    header = (f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} | {platform.machine()} "
              f"{os.cpu_count()} CPUs | load average {[round(x, 2) for x in os.getloadavg()]}")
    print(header, flush=True)
    rows = []
    models, layouts = MODELS, {**LAYOUTS, **HOLDOUT, **FRESH}
    if args.sealed:
        models, layouts, runs = load_sealed(args.sealed)
        header += f" | sealed set {args.sealed}"
    else:
        runs = [(model, name) for model in args.model
                for name in args.layout or list(FRESH if args.fresh else HOLDOUT if args.holdout else LAYOUTS)]
    for model, name in runs:
        world, overrides = layouts[name]
        overrides = [*overrides, *args.set]
        t0 = time.perf_counter()
        ranks = measure_layout(overrides, world, models[model], steps=args.steps)
        rows.append({"model": model, "layout": name, "world_size": world, "overrides": overrides,
                     "wall_s": round(time.perf_counter() - t0, 1), "ranks": ranks,
                     "plan": plan_command(models[model], world, overrides)})
        print(f"{model} {name}: {rows[-1]['wall_s']} s wall, peak MB per rank "
              f"{[_mb(r['peak_bytes']) for r in ranks]}", flush=True)
    print()
    print(_table(rows))
    print(f"\n{len(rows)} layouts in {time.perf_counter() - started:.1f} s; load average after "
          f"{[round(x, 2) for x in os.getloadavg()]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "models": {m: models[m].to_dict() for m in dict.fromkeys(r[0] for r in runs)},
                       "layouts": rows},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
