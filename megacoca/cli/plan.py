"""`megacoca plan`: the command line only; the model is megacoca.plan.memory / timing / search, the
calibration megacoca.profiling.calibrate.

    megacoca plan --flavor coca_giant --cluster a100-80gb --gpus 512 --global-batch 65536
    megacoca plan --flavor coca_base --cluster my_h100.json --gpus 64 --global-batch 4096 --emit-config base.yaml
    megacoca plan --calibrate cpu.json --ranks 2          # measure this machine into a profile
    megacoca plan --flavor coca_base --cluster h100 --layout tp=2,dp=4,zero=3,micro=8,ckpt=on   # one layout

Prints the fastest layouts that fit in memory (tensor x pipeline x data-parallel degrees, ZeRO stage,
micro-batch x accumulation, activation checkpointing, text-ahead) with the predicted peak memory per GPU, step
rate, MFU against the device's datasheet peak, contrastive negatives per image and what limits each. The
profile used (a preset's published efficiencies, or a calibrated one) is named in the header. With --layout, the
prediction for that one layout instead: each pipeline stage's peak per GPU by category and the step time by part
(megacoca.cli.plan_layout).
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from megacoca.cli import inputs, plan_layout
from megacoca.cli.inputs import argument
from megacoca.config.flavors import get_flavor
from megacoca.config.train import ConfigError
from megacoca.metrics.flops import train_flops_per_sample


def register(subparsers) -> None:
    parser = subparsers.add_parser("plan", help="which parallel layout trains a CoCa fastest in memory",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="coca_giant", help="model flavor (megacoca.config.flavors)")
    parser.add_argument("--set", dest="model_overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="a CoCaConfig field on top of the flavor (repeatable)")
    parser.add_argument("--cluster", default="a100-80gb",
                        help="a preset (a100-40gb, a100-80gb, h100, h200) or a profile JSON from --calibrate")
    parser.add_argument("--gpus", type=argument(inputs.positive_int), default=None,
                        help="GPUs in the job (default 512; with --layout: tp x pp x dp)")
    parser.add_argument("--gpus-per-node", type=argument(inputs.positive_int), default=None,
                        help="GPUs per node (default: the profile's)")
    parser.add_argument("--global-batch", type=argument(inputs.positive_int), default=None,
                        help="samples per optimizer step (default 65536; with --layout: micro x accum x dp)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                        help="default bf16 (with --layout and a DeepSpeed config: the config's)")
    parser.add_argument("--kernels", choices=("triton", "torch"), default="triton",
                        help="triton: the fused caption loss keeps no logits (what `auto` does on CUDA)")
    parser.add_argument("--min-negatives", type=argument(inputs.non_negative_int), default="0",
                        help="only layouts with at least this many contrastive negatives per image")
    parser.add_argument("--negatives", choices=("micro", "global"), default="micro",
                        help="loss.negatives: the micro-batch gathered over dp (micro), or the whole global batch "
                             "(global: one extra forward of both towers per step)")
    parser.add_argument("--memory-fraction", type=argument(_memory_fraction), default="0.9",
                        help="share of the device memory a layout may use, in (0, 1] (default 0.9)")
    parser.add_argument("--top", type=argument(inputs.positive_int), default="10", help="layouts to print (default 10)")
    parser.add_argument("--layout", default=None, metavar="SPEC",
                        help="predict this one layout: tp=,pp=,dp=,zero=,micro=,accum=,ckpt=on|off,text_ahead=auto|N,"
                             "keep_gathered=on|off,overlap=on|off (megacoca.cli.plan_layout)")
    parser.add_argument("--deepspeed-config", default=None, metavar="NAME|PATH",
                        help="the DeepSpeed JSON whose buffer sizes the memory model uses (with --layout also the "
                             "ZeRO stage and precision); default: the shipped configs'")
    parser.add_argument("--deepspeed-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a dotted DeepSpeed key on top of --deepspeed-config (repeatable), e.g. "
                             "zero_optimization.reduce_bucket_size=1e7")
    parser.add_argument("--emit-config", default=None, metavar="PATH",
                        help="write the best layout as a config file for `megacoca train --config PATH`")
    parser.add_argument("--json", default=None, metavar="PATH", help="write every fitting layout as JSON")
    parser.add_argument("--calibrate", default=None, metavar="PATH",
                        help="measure this machine into a profile JSON instead of planning")
    parser.add_argument("--ranks", type=argument(inputs.positive_int), default="2",
                        help="--calibrate: ranks measured at once (default 2)")
    parser.set_defaults(func=plan_command)


def _memory_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:  # also refuses nan
        raise ConfigError(f"the share of a device's memory must be in (0, 1], got {text}")
    return value


def _model_config(args):
    overrides = inputs.assignments(args.model_overrides, "--set", "FIELD=VALUE")
    try:
        return get_flavor(args.flavor, **overrides), overrides
    except (TypeError, ValueError) as error:
        raise ConfigError(f"--flavor/--set: {error}") from None


def _calibrate(args) -> int:
    # heavy (torch, DeepSpeed, the Trainer): `megacoca --help` imports this module
    from megacoca.plan.profile import save_profile
    from megacoca.profiling.calibrate import calibrate

    profile = calibrate(ranks=int(args.ranks))  # both precisions: one profile plans fp32 and bf16 layouts
    save_profile(profile, args.calibrate)
    rates = ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in profile.matmul_flops.items())
    print(f"wrote {args.calibrate}: matmuls {rates} per rank; {profile.source}")
    return 0


def _print_table(plans: list, top: int) -> None:
    header = ["#", "tp", "pp", "dp", "ZeRO", "micro x accum", "ckpt", "text-ahead", "kept gathered", "peak GB",
              "samples/s",
              "/GPU", "MFU", "negatives", "limited by (beyond compute)"]
    rows = []
    for index, item in enumerate(plans[:top], start=1):
        layout, time = item.layout, item.time
        rows.append([str(index), str(layout.tp), str(layout.pp), str(layout.dp), str(layout.zero_stage),
                     f"{layout.micro_batch} x {layout.grad_accum}", "yes" if layout.checkpointing else "no",
                     str(layout.text_ahead) if layout.pp > 1 else "-",
                     ("yes" if layout.keep_gathered else "no") if layout.pp > 1 and layout.zero_stage == 3 else "-",
                     f"{item.peak_bytes / 1e9:.1f}",
                     f"{time.samples_per_s:,.0f}", f"{time.samples_per_s_per_gpu:.1f}",
                     "-" if time.mfu is None else f"{100 * time.mfu:.1f}%", f"{item.negatives:,}", item.limit()])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def _write_outputs(args, plans: list, overrides: dict, gpus: int) -> None:
    """--emit-config: the best layout as a config file; --json: every fitting layout."""
    from megacoca.plan.search import emit_config  # heavy (torch): `megacoca --help` imports this module

    if args.emit_config:
        config = emit_config(plans[0], args.flavor, overrides)
        with open(args.emit_config, "w") as f:
            if args.emit_config.endswith((".yaml", ".yml")):
                yaml.safe_dump(config, f, sort_keys=False)
            else:
                json.dump(config, f, indent=1)
        print(f"wrote {args.emit_config}: `megacoca train --config {args.emit_config}` runs layout #1 on {gpus} "
              "GPUs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"layout": item.layout.record(), "peak_bytes": item.peak_bytes,
                        "stages": [{**vars(stage), "peak": stage.peak} for stage in item.memory],
                        "step_s": item.time.seconds,
                        "samples_per_s": item.time.samples_per_s, "mfu": item.time.mfu, "parts": item.time.parts}
                       for item in plans], f, indent=1, default=str)


def plan_command(args) -> int:
    # heavy (torch, through the meta-device model build): `megacoca --help` imports this module
    from megacoca.plan.memory import ZeroBuffers
    from megacoca.plan.params import stage_tensors
    from megacoca.plan.presets import get_profile
    from megacoca.plan.search import pin, plan

    if args.calibrate:
        return _calibrate(args)
    cfg, overrides = _model_config(args)
    try:
        profile = get_profile(args.cluster)
    except ValueError as error:
        raise ConfigError(f"--cluster: {error}") from None
    if args.gpus_per_node:
        profile = profile.with_nodes(int(args.gpus_per_node))
    ds = plan_layout.deepspeed_json(args)
    buffers = ZeroBuffers.from_ds_config(ds) if ds is not None else None
    fraction = float(args.memory_fraction)
    params = stage_tensors(cfg, 1, 1)[0].elements
    model_line = (f"{args.flavor}: {params / 1e6:,.0f}M parameters, {train_flops_per_sample(cfg) / 1e12:.3g} TFLOP "
                  "per sample (train)")
    if args.layout:
        layout = plan_layout.pinned_layout(args, ds, cfg)
        print(f"{model_line} | {profile.gpus_per_node} GPUs per node, {profile.memory_bytes / 1e9:.0f} GB each | "
              f"{args.kernels} kernels | {args.negatives} negatives")
        print(f"profile {profile.name}: {profile.source}")
        result = plan_layout.report(pin(cfg, layout, profile, buffers), profile, fraction)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1, default=str)
        return 0
    gpus, batch = int(args.gpus or 512), int(args.global_batch or 65536)
    precision = args.precision or "bf16"
    plans, too_big = plan(cfg, profile, gpus, batch, precision, kernels=args.kernels, buffers=buffers,
                          memory_fraction=fraction, min_negatives=int(args.min_negatives), negatives=args.negatives)
    print(f"{model_line} | {gpus} GPUs ({profile.gpus_per_node} per node, {profile.memory_bytes / 1e9:.0f} GB "
          f"each) | global batch {batch:,} | {precision}, {args.kernels} kernels | {args.negatives} negatives")
    print(f"profile {profile.name}: {profile.source}")
    if not plans:
        print(f"no layout fits in {fraction:.0%} of {profile.memory_bytes / 1e9:.0f} GB ({too_big} valid "
              "layouts were too big)", file=sys.stderr)
        return 1
    _print_table(plans, int(args.top))
    print(f"{len(plans)} layouts fit, {too_big} more were valid but too big")
    _write_outputs(args, plans, overrides, gpus)
    return 0
