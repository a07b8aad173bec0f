"""`megacoca plan --layout`: the prediction for one layout a user names, instead of the search.

    megacoca plan --flavor coca_base --cluster h100 --layout tp=2,pp=1,dp=4,zero=3,micro=8,ckpt=on
    megacoca plan --flavor coca_tiny --layout pp=2,dp=2,micro=4,accum=2,keep_gathered=on \\
        --deepspeed-config zero3_bf16 --deepspeed-set zero_optimization.stage3_param_persistence_threshold=0

The spec is comma-separated KEY=VALUE: tp, pp, dp, zero, micro, accum, ckpt (on/off), text_ahead (auto or a count),
keep_gathered (on/off), overlap (on/off: the text tower beside the image tower, what parallel.overlap_text_tower=auto
does on a GPU without a pipeline; default on where pp = 1). tp and pp default to 1; dp to --gpus / (tp x pp); micro to
what --global-batch leaves; accum to 1 or what --global-batch leaves; zero to the stage of --deepspeed-config;
text_ahead to auto (the time model's choice). The DeepSpeed config (a ds_configs name or a path, plus dotted
--deepspeed-set keys) gives the buffer sizes the memory model uses and, unless --precision says otherwise, the
precision. Prints each pipeline stage's peak per rank (parameters, gradients, optimizer state, activations,
transients; every rank of a stage holds the same) and the step time by part; --json writes the same with every stage's
peak.
"""

from __future__ import annotations

from megacoca.config.train import ConfigError

KEYS = ("tp", "pp", "dp", "zero", "micro", "accum", "ckpt", "text_ahead", "keep_gathered", "overlap")
_SWITCH = {"on": True, "true": True, "1": True, "yes": True, "off": False, "false": False, "0": False, "no": False}


def parse_spec(spec: str) -> dict:
    """{key: value} of a --layout spec: integers >= 1 (zero 0-3, text_ahead >= 0 or "auto"), switches on/off."""
    values = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not text:
            raise ConfigError(f"--layout: expected KEY=VALUE, got {item!r}")
        if key not in KEYS:
            raise ConfigError(f"--layout: unknown key {key!r} (one of {', '.join(KEYS)})")
        if key in values:
            raise ConfigError(f"--layout: {key} given twice")
        if key in ("ckpt", "keep_gathered", "overlap"):
            if text.lower() not in _SWITCH:
                raise ConfigError(f"--layout: {key} must be on or off, got {text!r}")
            values[key] = _SWITCH[text.lower()]
            continue
        if key == "text_ahead" and text == "auto":
            values[key] = -1
            continue
        try:
            number = int(text)
        except ValueError:
            raise ConfigError(f"--layout: {key} must be an integer, got {text!r}") from None
        lowest = 0 if key in ("zero", "text_ahead") else 1
        if number < lowest or (key == "zero" and number > 3):
            expected = "0, 1, 2 or 3" if key == "zero" else f"an integer >= {lowest}"
            raise ConfigError(f"--layout: {key} must be {expected}, got {number}")
        values[key] = number
    return values


def deepspeed_json(args) -> dict | None:
    """The DeepSpeed config --deepspeed-config names, with --deepspeed-set applied; None when neither is given
    (the shipped configs' buffer sizes)."""
    from megacoca.config.deepspeed import apply_overrides, check_json, load_json

    if not args.deepspeed_config and not args.deepspeed_set:
        return None
    ds = load_json(args.deepspeed_config) if args.deepspeed_config else {}
    from megacoca.cli.inputs import assignments

    overrides = assignments(args.deepspeed_set, "--deepspeed-set", "KEY=VALUE (a dotted DeepSpeed key)",
                            require_key=True)
    try:
        apply_overrides(ds, overrides)
        check_json(ds, args.deepspeed_config or "--deepspeed-set")
    except ConfigError as error:
        raise ConfigError(f"--deepspeed-config/--deepspeed-set: {error}") from None
    return ds


def pinned_layout(args, ds: dict | None, cfg):
    """The Layout the spec names, completed from --gpus, --global-batch and the DeepSpeed config; ConfigError (one
    line) for a missing, contradicting or impossible value."""
    from megacoca.config.deepspeed import json_precision, zero_stage
    from megacoca.config.layout import Layout
    from megacoca.plan.search import check_pinned

    spec = parse_spec(args.layout)
    tp, pp = spec.get("tp", 1), spec.get("pp", 1)
    gpus = int(args.gpus) if args.gpus else None
    batch = int(args.global_batch) if args.global_batch else None
    dp = spec.get("dp")
    if dp is None:
        if gpus is None:
            raise ConfigError("--layout: give dp= (or --gpus)")
        if gpus % (tp * pp):
            raise ConfigError(f"--layout: --gpus {gpus} is not divisible by tp {tp} x pp {pp}")
        dp = gpus // (tp * pp)
    if gpus is not None and gpus != tp * pp * dp:
        raise ConfigError(f"--layout: tp {tp} x pp {pp} x dp {dp} = {tp * pp * dp} GPUs, but --gpus says {gpus}")
    micro, accum = spec.get("micro"), spec.get("accum")
    if micro is None or (accum is None and batch is not None):
        if batch is None:
            raise ConfigError("--layout: give micro= (or --global-batch)")
        per_rank, rest = divmod(batch, dp)
        if rest:
            raise ConfigError(f"--layout: --global-batch {batch} is not divisible by dp {dp}")
        if micro is None:
            micro = per_rank // (accum or 1)
            if micro < 1 or micro * (accum or 1) != per_rank:
                raise ConfigError(f"--layout: --global-batch {batch} over dp {dp} is {per_rank} per rank, not a "
                                  f"multiple of accum {accum or 1}")
        if accum is None:
            accum, rest = divmod(per_rank, micro)
            if rest or accum < 1:
                raise ConfigError(f"--layout: --global-batch {batch} over dp {dp} is {per_rank} per rank, not a "
                                  f"multiple of micro {micro}")
    accum = accum or 1
    if batch is not None and batch != micro * accum * dp:
        raise ConfigError(f"--layout: micro {micro} x accum {accum} x dp {dp} = {micro * accum * dp}, but "
                          f"--global-batch says {batch}")
    zero = spec.get("zero")
    if ds is not None and "stage" in ds.get("zero_optimization", {}):
        if zero is not None and zero != zero_stage(ds):
            raise ConfigError(f"--layout: zero={zero}, but the DeepSpeed config says stage {zero_stage(ds)}")
        zero = zero_stage(ds)
    if zero is None:
        raise ConfigError("--layout: give zero= (or --deepspeed-config)")
    precision = args.precision
    if ds is not None and ("bf16" in ds or "fp16" in ds):
        if precision and precision != json_precision(ds):
            raise ConfigError(f"--precision {precision}, but the DeepSpeed config trains in {json_precision(ds)}")
        precision = json_precision(ds)
    layout = Layout(tp=tp, pp=pp, dp=dp, zero_stage=zero, precision=precision or "bf16", micro_batch=micro,
                    grad_accum=accum, checkpointing=spec.get("ckpt", False), text_ahead=spec.get("text_ahead", -1),
                    keep_gathered=spec.get("keep_gathered", False), kernels=args.kernels, negatives=args.negatives,
                    text_overlap=spec.get("overlap", pp == 1))
    try:
        check_pinned(cfg, layout)
    except ValueError as error:
        raise ConfigError(f"--layout {layout.describe()}: {error}") from None
    return layout


def stage_ranks(layout, stage: int) -> list[int]:
    """The global ranks of pipeline stage `stage` (ranks laid out (dp, pp, tp), tp fastest: megacoca.parallel.dims)."""
    return [(d * layout.pp + stage) * layout.tp + t for d in range(layout.dp) for t in range(layout.tp)]


def _unit(nbytes: float) -> tuple[float, str]:
    return (1e9, "GB") if nbytes >= 1e9 else (1e6, "MB")


def report(pinned, profile, memory_fraction: float) -> dict:
    """Print the pinned layout's per-stage memory and step time; return the same as plain data (--json)."""
    layout, time = pinned.layout, pinned.time
    budget = memory_fraction * profile.memory_bytes
    scale, unit = _unit(pinned.peak_bytes)
    print(f"layout {layout.describe()} on {layout.world} GPUs, global batch {layout.global_batch:,}"
          + (f" (text-ahead {layout.text_ahead}: the time model's choice)" if layout.pp > 1 else ""))
    head = ["stage", "ranks", f"parameters {unit}", f"gradients {unit}", f"optimizer {unit}", f"activations {unit}",
            f"transient {unit}", f"peak {unit}", "at", "fits"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    stages = []
    for stage in pinned.memory:
        ranks = stage_ranks(layout, stage.stage)
        fits = stage.peak <= budget
        cells = [str(stage.stage), f"{len(ranks)} ({ranks[0]}{', ...' if len(ranks) > 1 else ''})",
                 *(f"{value / scale:.3f}" for value in (stage.params, stage.grads, stage.optimizer,
                                                         stage.activations, stage.transient, stage.peak)),
                 stage.phase, "yes" if fits else "NO"]
        print("| " + " | ".join(cells) + " |")
        stages.append({"stage": stage.stage, "ranks": ranks, "params": stage.params, "grads": stage.grads,
                       "optimizer": stage.optimizer, "activations": stage.activations,
                       "transient": stage.transient, "peak": stage.peak, "phase": stage.phase, "fits": fits})
    fits = pinned.peak_bytes <= budget
    print(f"peak {pinned.peak_bytes / scale:.3f} {unit} per GPU: "
          + (f"fits in {memory_fraction:.0%} of {profile.memory_bytes / 1e9:.0f} GB" if fits else
             f"does NOT fit in {memory_fraction:.0%} of {profile.memory_bytes / 1e9:.0f} GB"))
    mfu = "-" if time.mfu is None else f"{100 * time.mfu:.1f}%"
    print(f"step {time.seconds:.4g} s: {time.samples_per_s:,.1f} samples/s, {time.samples_per_s_per_gpu:.2f} per GPU, "
          f"MFU {mfu}")
    print("| part of the step | seconds | share |")
    print("|---|---|---|")
    for part, seconds in time.parts.items():
        if seconds:
            within = part in ("tensor-parallel all-reduces", "pipeline bubble")  # inside the makespan above
            print(f"| {'of which ' if within else ''}{part} | {seconds:.4g} | {100 * seconds / time.seconds:.0f}% |")
    return {"layout": layout.record(), "world": layout.world, "stages": stages, "peak_bytes": pinned.peak_bytes,
            "budget_bytes": budget, "fits": fits, "step_s": time.seconds, "samples_per_s": time.samples_per_s,
            "samples_per_s_per_gpu": time.samples_per_s_per_gpu, "mfu": time.mfu, "parts": time.parts}
