"""Tensor parallelism (issue 7): per-rank memory, communication per step, and step time on CPU ranks.

Three subcommands; each prints markdown tables with the command line, torch/DeepSpeed versions, CPU count and
load average, and writes nothing else unless `--json PATH` is given.

    python benchmarks/tensor_parallel.py memory      # coca_base/large/giant, TP 1/2/4/8 x ZeRO-3 over 64 dp ranks
    python benchmarks/tensor_parallel.py comm        # TP all-reduces of one forward+backward, TP 2/4/8, B=8
    python benchmarks/tensor_parallel.py steptime    # TP=2 against DP=2 on 2 CPU ranks, alternating rounds

memory
  (a) analytic: every parameter tensor's per-rank shape from the model config by formula (column-parallel
      weights and biases, row-parallel weights, padded vocabulary rows are sharded; everything else replicated),
      independently of the model code;
  (b) from the real shard shapes: the model built on the meta device and parallelized by the project's own
      `parallelize` / `apply_tensor_parallel` in a process that plays rank 0 (and rank tp-1) of the full world
      (64 x tp) under torch's fake process group.
  ZeRO-3 over the dp=64 ranks is then DeepSpeed 0.19.8's arithmetic (partition_parameters.py `_partition_param`):
  every tensor is padded to a multiple of dp and each rank keeps ceil(numel / dp) elements; tensors of at most
  `stage3_param_persistence_threshold` elements (1e5 in ds_configs/zero3_bf16.json) are also kept whole on every
  rank after their first gather (`ds_persist`). Bytes per element (zero3_bf16.json, no `data_types` section):
  bf16 parameter partition 2, gradient partition 2 (stage3 `grad_partitions_flat_buffer` is in
  `gradient_accumulation_dtype`, which the engine sets to the model dtype, bf16, unless
  `data_types.grad_accum_dtype` says fp32; then 4), fp32 master 4, Adam exp_avg + exp_avg_sq 8; plus, during the
  optimizer step only, an fp32 copy of the gradient partition (4, per sub-group; `_prepare_fp32_grad_for_sub_group`).
  (c) measured: coca_base at TP=2 x DP=2 on 4 gloo CPU ranks (tests/distributed/dist_harness.py `run_ranks`),
      built by `build_parallel_model` and handed with the trainer's AdamW to `deepspeed.initialize` exactly as the
      Trainer does, then one step of one sample per dp rank (DeepSpeed 0.19.8 creates AdamW's state at the first
      step); each rank's partition sizes and dtypes read back from DeepSpeed (ds_tensor, the stage-3 optimizer's
      flat bf16/fp32 partitions, its gradient buffer and the AdamW state) against (a) for world 4. coca_large
      would need ~2x the 3.7 GB peak per rank measured for coca_base, x 4 ranks: not on a shared 24 GB box
      (`--measure coca_base coca_large` to try).

comm
  `torch.distributed.all_reduce` / `all_gather` (and the other collectives) are wrapped to record (op, group, dtype,
  elements) while one micro-batch runs forward, the CoCa loss and backward on the meta device under the fake
  process group (rank 0 of 64 x tp). Counted calls on the tensor-parallel group are compared, key by key, with the
  Megatron count derived for CoCa's graph (`analytic_comm`). bf16 activations (the zero3_bf16 training dtype),
  the vocabulary-parallel cross-entropy in fp32; every text position kept (no padding to trim). Counted and
  analytic agree call for call and element for element. With activation checkpointing the blocks' forward all-reduces run again in backward,
  except each block's last one (torch's checkpoint early stop).

steptime
  coca_tiny (kernels "torch") on 2 CPU ranks, ZeRO-3 fp32 (ds_configs/zero3_fp32.json as shipped), the same global
  batch: TP=2 (dp=1) against DP=2 (tp=1), through the Trainer's own `train_step`, in alternating fresh launches;
  the median step of each launch, then the median over launches.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import inspect
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(REPO, "tests", "distributed")
for _path in (REPO, HARNESS):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from megacoca.plan.comm import analytic_comm  # noqa: E402  (the planner's; checked here against the meta count)

PAPER_FLAVORS = ("coca_base", "coca_large", "coca_giant")
MB = 1e6


# ------------------------------------------------------------------------------------------------ reporting
def environment() -> dict:
    import torch

    try:
        import deepspeed

        ds_version = deepspeed.__version__
    except Exception as error:  # noqa: BLE001 - reported, not fatal
        ds_version = f"unavailable ({error})"
    return {
        "command": " ".join([os.path.relpath(sys.executable, os.getcwd()) if sys.executable.startswith(os.getcwd())
                             else sys.executable] + sys.argv),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "deepspeed": ds_version,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def print_header(title: str) -> None:
    env = environment()
    print(f"\n### {title}\n")
    print(f"- command: `{env['command']}`")
    print(f"- {env['date']} | torch {env['torch']} | deepspeed {env['deepspeed']} | python {env['python']} | "
          f"{env['cpus']} CPUs ({env['machine']}), no GPU used | load average {env['loadavg']}\n")


def print_table(headers: list[str], rows: list[list]) -> None:
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    print()


def mb(nbytes: float) -> str:
    return f"{nbytes / MB:,.1f}"


def millions(n: float) -> str:
    return f"{n / 1e6:,.3f}"


# ------------------------------------------------------------------------------------- analytic parameters
def analytic_tensors(cfg, tp: int) -> list[tuple[str, int, bool, int]]:
    """Every parameter tensor one tensor-parallel rank holds, by formula from the config alone:
    (where, numel on this rank, sharded?, numel of the single-device tensor)."""
    out: list[tuple[str, int, bool, int]] = []
    vp = -(-cfg.vocab_size // tp) * tp  # vocabulary padded to a multiple of tp

    def rep(where, n):
        out.append((where, n, False, n))

    def shard(where, n_local, n_full):
        out.append((where, n_local, tp > 1, n_full))

    def ln(where, dim):
        rep(where, dim)
        rep(where, dim)

    def attention(where, dim, kv_dim):
        shard(where, dim // tp * dim, dim * dim)  # q weight (column)
        shard(where, dim // tp, dim)  # q bias
        for _ in ("k", "v"):
            shard(where, dim // tp * kv_dim, dim * kv_dim)
            shard(where, dim // tp, dim)
        shard(where, dim * (dim // tp), dim * dim)  # out weight (row)
        rep(where, dim)  # out bias: replicated, added after the all-reduce

    def mlp(where, dim, hidden):
        shard(where, hidden // tp * dim, hidden * dim)
        shard(where, hidden // tp, hidden)
        shard(where, dim * (hidden // tp), dim * hidden)
        rep(where, dim)

    wv, wt, dp_, e = cfg.vision_width, cfg.text_width, cfg.pooled_width, cfg.embed_dim
    # image encoder
    rep("vision embed", wv * cfg.in_channels * cfg.patch_size ** 2)
    if cfg.vision_patch_bias:
        rep("vision embed", wv)
    if cfg.vision_class_token:
        rep("vision embed", wv)
    rep("vision embed", cfg.image_tokens * wv)
    if cfg.vision_ln_pre:
        ln("vision embed", wv)
    for _ in range(cfg.vision_layers):
        ln("vision blocks", wv)
        attention("vision blocks", wv, wv)
        ln("vision blocks", wv)
        mlp("vision blocks", wv, cfg.vision_mlp_dim)
    # attentional poolers
    rep("poolers", cfg.caption_queries * dp_)
    ln("poolers", dp_)
    ln("poolers", wv)
    attention("poolers", dp_, wv)
    if cfg.pooler_layout == "paper":
        rep("poolers", dp_)
        ln("poolers", dp_)
        ln("poolers", dp_)
        attention("poolers", dp_, dp_)
    ln("poolers", dp_)
    rep("poolers", e * dp_)
    # unimodal text decoder
    shard("token embedding", vp // tp * wt, cfg.vocab_size * wt)
    rep("text embed", (cfg.context_length + 1) * wt)
    rep("text embed", wt)
    for _ in range(cfg.text_layers):
        ln("text blocks", wt)
        attention("text blocks", wt, wt)
        ln("text blocks", wt)
        mlp("text blocks", wt, cfg.text_mlp_dim)
    ln("text outputs", wt)
    rep("text outputs", e * wt)
    # multimodal decoder
    for _ in range(cfg.decoder_layers):
        ln("decoder layers", wt)
        attention("decoder layers", wt, wt)
        if cfg.decoder_mlp_after_self_attn:
            ln("decoder layers", wt)
            mlp("decoder layers", wt, cfg.text_mlp_dim)
        ln("decoder layers", wt)
        ln("decoder layers", dp_)
        attention("decoder layers", wt, dp_)
        ln("decoder layers", wt)
        mlp("decoder layers", wt, cfg.text_mlp_dim)
    ln("decoder layers", wt)
    if not cfg.tie_word_embeddings:
        shard("caption head", vp // tp * wt, cfg.vocab_size * wt)
    if cfg.decoder_bias:
        shard("caption head", vp // tp, cfg.vocab_size)
    rep("logit scale", 1)
    return out


def refusal(cfg, tp: int) -> str:
    """Why the project refuses this TP degree for the config (check_tensor_parallel's message), or ''."""
    from megacoca.parallel.tensor import check_tensor_parallel

    try:
        check_tensor_parallel(cfg, tp)
    except ValueError as error:
        return str(error)
    return ""


def fake_world(world_size: int, rank: int):
    """A fake process group playing `rank` of `world_size` (collectives are no-ops)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


def meta_parallel_model(cfg, tp: int, dp: int, rank_in_tp: int = 0, activation_checkpointing: bool = False):
    """CoCa on the meta device, parallelized by the project's own code as rank (dp 0, tp `rank_in_tp`) of a
    (dp x tp) world under the fake process group. Returns (model, dims)."""
    import torch

    from megacoca.models.coca import CoCa
    from megacoca.parallel.dims import ParallelDims
    from megacoca.parallel.parallelize import parallelize

    world = dp * tp
    fake_world(world, rank_in_tp)  # grid (dp, 1, tp): rank r < tp is (dp 0, tp r)
    dims = ParallelDims(dp=dp, tp=tp, pp=1, world_size=world).build()
    assert dims.tp_rank == rank_in_tp and dims.dp_rank == 0, (dims.tp_rank, dims.dp_rank)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = CoCa(cfg)
    parallelize(model, dims, activation_checkpointing=activation_checkpointing)
    return model, dims


def shard_tensors(model) -> list[tuple[str, int, bool, int]]:
    """(name, numel on this rank, sharded?, single-device numel) of every distinct parameter (tied once)."""
    from megacoca.parallel.tensor import is_tensor_parallel

    out = []
    for name, param in model.named_parameters():
        shard = getattr(param, "tp_shard", None)
        full = math.prod(shard.full_shape) if shard is not None else param.numel()
        out.append((name, param.numel(), is_tensor_parallel(param), full))
    return out


def zero3_layout(tensors, dp: int, persistence_threshold: int) -> dict:
    """DeepSpeed 0.19.8 ZeRO-3 over `dp` ranks of one tensor-parallel rank's tensors."""
    numels = [t[1] for t in tensors]
    partition = sum(-(-n // dp) for n in numels)
    persistent = [n for n in numels if n <= persistence_threshold]
    return {
        "tensors": len(numels),
        "tp_rank_elements": sum(numels),
        "sharded_elements": sum(t[1] for t in tensors if t[2]),
        "replicated_elements": sum(t[1] for t in tensors if not t[2]),
        "single_device_elements": sum(t[3] for t in tensors),
        "partition_elements": partition,
        "zero_padding_elements": partition * dp - sum(numels),
        "persistent_tensors": len(persistent),
        "persistent_elements": sum(persistent),
    }


def replicated_cell(case: dict, layout: dict) -> str:
    if case["tp"] == 1:  # nothing is sharded; name what TP > 1 would keep whole (independent of the degree)
        return f"- (TP>1 keeps {millions(case['replicated_under_tp'])} whole)"
    share = 100 * layout["replicated_elements"] / layout["tp_rank_elements"]
    return f"{millions(layout['replicated_elements'])} ({share:.2f}%)"


def memory_bytes(layout: dict, grad_bytes: int = 2) -> dict:
    part = layout["partition_elements"]
    out = {
        "params_bf16": 2 * part,
        "persistent_whole_bf16": 2 * layout["persistent_elements"],
        "grads": grad_bytes * part,
        "master_fp32": 4 * part,
        "adam_fp32": 8 * part,
    }
    out["total"] = sum(out.values())
    out["step_transient_fp32_grads"] = 4 * part
    return out


def cmd_memory(args) -> dict:
    import torch.distributed as dist

    from megacoca.config.deepspeed import load_json
    from megacoca.config.flavors import get_flavor

    ds = load_json(args.ds_config)
    threshold = int(ds.get("zero_optimization", {}).get("stage3_param_persistence_threshold", 100_000))
    results = {"env": environment(), "dp": args.dp, "persistence_threshold": threshold, "cases": []}
    started = time.perf_counter()
    for flavor in args.flavors:
        cfg = get_flavor(flavor, kernels="torch")
        for tp in args.tp:
            refused = refusal(cfg, tp)
            if refused:
                results["cases"].append({"flavor": flavor, "tp": tp, "world": args.dp * tp, "refused": refused})
                continue
            analytic = analytic_tensors(cfg, tp)
            model, _ = meta_parallel_model(cfg, tp, args.dp, rank_in_tp=0)
            shapes = shard_tensors(model)
            if tp > 1:  # the last tensor-parallel rank holds the same numbers (equal padded shards)
                last, _ = meta_parallel_model(cfg, tp, args.dp, rank_in_tp=tp - 1)
                assert sorted(t[1] for t in shard_tensors(last)) == sorted(t[1] for t in shapes), flavor
            a, b = zero3_layout(analytic, args.dp, threshold), zero3_layout(shapes, args.dp, threshold)
            same_multiset = sorted((t[1], t[2]) for t in analytic) == sorted((t[1], t[2]) for t in shapes)
            results["cases"].append({"flavor": flavor, "tp": tp, "world": args.dp * tp, "analytic": a,
                                     "shard_shapes": b, "same_tensor_multiset": same_multiset,
                                     "replicated_under_tp": sum(t[1] for t in analytic_tensors(cfg, 2) if not t[2]),
                                     "bytes": memory_bytes(b)})
    if dist.is_initialized():
        dist.destroy_process_group()
    results["meta_seconds"] = round(time.perf_counter() - started, 1)

    print_header(f"memory per rank: TP x ZeRO-3 over dp={args.dp} ({args.ds_config}), parameters by formula and "
                 "from the real shard shapes")
    rows = []
    for case in results["cases"]:
        if "refused" in case:
            rows.append([case["flavor"], case["tp"], case["world"], f"not possible: {case['refused']}"] + [""] * 10)
            continue
        a, b = case["analytic"], case["shard_shapes"]
        rows.append([case["flavor"], case["tp"], case["world"], millions(b["single_device_elements"]),
                     millions(a["tp_rank_elements"]), millions(b["tp_rank_elements"]),
                     b["tp_rank_elements"] - a["tp_rank_elements"],
                     replicated_cell(case, b),
                     millions(a["partition_elements"]), millions(b["partition_elements"]),
                     b["partition_elements"] - a["partition_elements"], b["zero_padding_elements"],
                     f"{b['persistent_tensors']} / {millions(b['persistent_elements'])}",
                     "yes" if case["same_tensor_multiset"] else "NO"])
    print_table(["flavor", "TP", "world", "model (M)", "per TP rank (M) analytic", "from shard shapes",
                 "diff (elements)", "replicated per TP rank (M, share)", "ZeRO-3 partition per rank (M) analytic",
                 "from shard shapes", "diff", "ZeRO padding (elements)", "persistent tensors / M elements",
                 "same tensor sizes"], rows)
    rows = []
    base = {}
    for case in results["cases"]:
        if "refused" in case:
            continue
        by = case["bytes"]
        base.setdefault(case["flavor"], by["total"])
        rows.append([case["flavor"], case["tp"], mb(by["params_bf16"]), mb(by["persistent_whole_bf16"]),
                     mb(by["grads"]), mb(by["master_fp32"]), mb(by["adam_fp32"]), mb(by["total"]),
                     f"{by['total'] / base[case['flavor']]:.3f}", mb(by["step_transient_fp32_grads"]),
                     mb(by["total"] + 2 * case["shard_shapes"]["partition_elements"])])
    print("Bytes per rank in MB (1e6), from the shard shapes (column (b) above); ZeRO-3 bf16 as DeepSpeed 0.19.8 "
          "keeps it with ds_configs/" f"{args.ds_config}.json:\n")
    print_table(["flavor", "TP", "bf16 param partition", "persistent params whole (bf16)",
                 "grad partition (bf16)", "fp32 master", "Adam m+v (fp32)", "total", "vs TP=1",
                 "+ fp32 grads during step", "total with grad_accum_dtype=fp32"], rows)

    if args.measure:
        results["measured"] = measure_memory(args, threshold)
    return results


# --------------------------------------------------------------------------- measured memory on CPU ranks
def _measure_rank(rank, world_size, flavor, ds_name, dp, tp):
    import logging

    import deepspeed
    import torch

    from megacoca.config.deepspeed import build_deepspeed_config
    from megacoca.config.recipes import build_config
    from megacoca.parallel.build import build_parallel_model
    from megacoca.parallel.dims import ParallelDims
    from megacoca.parallel.zero import partition_stats
    from megacoca.optim import build_optimizer

    deepspeed.utils.logger.setLevel(logging.WARNING)
    job = build_config(overrides=[f"model.flavor={flavor}", f"parallel.deepspeed_config={ds_name}",
                                  f"parallel.tp={tp}", f"schedule.global_batch_size={dp}",
                                  "schedule.micro_batch_size=1"])
    dims = ParallelDims(dp=dp, tp=tp, pp=1, world_size=world_size).build()
    ds_config = build_deepspeed_config(job, dims.dp_size)
    cfg = job.model_config().replace(kernels="torch")
    torch.manual_seed(job.seed)
    started = time.perf_counter()
    model = build_parallel_model(cfg, dims, ds_config=ds_config)
    optimizer = build_optimizer(model, job, ds_config)
    engine, zero, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=dims.mpu(),
                                              dist_init_required=False)
    seconds = time.perf_counter() - started

    def rss(key):
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        return 0

    rss_init = rss("VmRSS:")
    # One real step (micro-batch of 1, a short caption): DeepSpeed 0.19.8 creates AdamW's exp_avg/exp_avg_sq at
    # the first optimizer step, not in initialize, and persistent parameters stay gathered after a forward.
    from megacoca.losses import CoCaLoss

    generator = torch.Generator().manual_seed(dims.dp_rank)
    images = torch.randn(1, 3, cfg.image_size, cfg.image_size, generator=generator).to(engine.device, torch.bfloat16
                                                                                        if "bf16" in ds_name else
                                                                                        torch.float32)
    text = torch.full((1, cfg.context_length), cfg.pad_id, dtype=torch.long)
    text[0, :8] = torch.randint(4, cfg.vocab_size, (8,), generator=generator)
    text[0, 0], text[0, 7] = 2, 3  # bos, eos
    step_started = time.perf_counter()
    loss, _ = CoCaLoss()(engine(images, text.to(engine.device)), dp_group=dims.dp_group)
    engine.backward(loss)
    engine.step()
    step_seconds = time.perf_counter() - step_started
    params = list(engine.module.parameters())
    ds_tensors = [p.ds_tensor for p in params]
    fp32 = list(zero.fp32_partitioned_groups_flat)
    states = [zero.optimizer.state[t] for t in fp32]
    stats = partition_stats(engine.module)
    gathered = sum(p.numel() for p in params)  # parameters held whole now (persistent ones after the forward)

    return {
        "rank": rank, "tp_rank": dims.tp_rank, "dp_rank": dims.dp_rank, "seconds": round(seconds, 1),
        "step_seconds": round(step_seconds, 1), "loss": float(loss.detach()), "rss_after_init_bytes": rss_init,
        "whole_after_step_elements": gathered,
        "tensors": len(params),
        "tp_rank_elements": sum(p.ds_numel for p in params),
        "ds_tensor_elements": sum(t.numel() for t in ds_tensors),
        "ds_tensor_dtypes": sorted({str(t.dtype) for t in ds_tensors}),
        "persistent_tensors": sum(1 for p in params if p.ds_persist),
        "persistent_elements": sum(p.ds_numel for p in params if p.ds_persist),
        "lp_flat_elements": sum(t.numel() for t in zero.fp16_partitioned_groups_flat),
        "lp_flat_dtypes": sorted({str(t.dtype) for t in zero.fp16_partitioned_groups_flat}),
        "fp32_elements": sum(t.numel() for t in fp32),
        "fp32_dtypes": sorted({str(t.dtype) for t in fp32}),
        "sub_groups": len(fp32),
        "adam_exp_avg_elements": sum(s["exp_avg"].numel() for s in states),
        "adam_exp_avg_sq_elements": sum(s["exp_avg_sq"].numel() for s in states),
        "adam_dtypes": sorted({str(s[k].dtype) for s in states for k in ("exp_avg", "exp_avg_sq")}),
        "grad_buffer_elements": zero.grad_partitions_flat_buffer.numel(),
        "grad_buffer_dtype": str(zero.grad_partitions_flat_buffer.dtype),
        "partition_stats": stats.describe(),
        "rss_bytes": rss("VmRSS:"), "peak_rss_bytes": rss("VmHWM:"),
    }


def dtypes(names) -> str:
    return "/".join(name.replace("torch.", "") for name in names)


def measure_memory(args, threshold: int) -> dict:
    import torch.distributed as dist

    from dist_harness import run_ranks

    from megacoca.config.flavors import get_flavor

    tp, dp = 2, 2
    out = {"layout": f"TP={tp} x DP={dp}", "ds_config": args.ds_config, "flavors": {}}
    for flavor in args.measure:
        cfg = get_flavor(flavor, kernels="torch")
        analytic = zero3_layout(analytic_tensors(cfg, tp), dp, threshold)
        model, _ = meta_parallel_model(cfg, tp, dp)
        shapes = zero3_layout(shard_tensors(model), dp, threshold)
        dist.destroy_process_group()
        load_before = [round(x, 2) for x in os.getloadavg()]
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            ranks = run_ranks(_measure_rank, tp * dp, tmp, flavor, args.ds_config, dp, tp, timeout=args.timeout)
        wall = time.perf_counter() - started
        out["flavors"][flavor] = {"analytic": analytic, "shard_shapes": shapes, "ranks": ranks,
                                  "wall_seconds": round(wall, 1), "load_before": load_before,
                                  "load_after": [round(x, 2) for x in os.getloadavg()]}

        print_header(f"measured: {flavor} at TP={tp} x DP={dp} on {tp * dp} gloo CPU ranks ({args.ds_config}), "
                     "DeepSpeed's partitions against the analytic layout for world 4")
        print(f"- formula and meta-device shard shapes for this layout agree: {'yes' if analytic == shapes else 'NO'}")
        losses = ", ".join(f"{r['loss']:.3f}" for r in ranks)
        print(f"- run_ranks wall time {wall:.1f} s (build + deepspeed.initialize per rank: "
              f"{', '.join(str(r['seconds']) for r in ranks)} s; then one step of 1 sample per dp rank: "
              f"{', '.join(str(r['step_seconds']) for r in ranks)} s, losses "
              f"{losses}); "
              f"load average before {load_before}, after {out['flavors'][flavor]['load_after']}\n")
        part = analytic["partition_elements"]
        rows = [["analytic (formula), world 4", "-", analytic["tp_rank_elements"], part, f"{part} bf16",
                 f"{part} bf16 (or fp32)", f"{part} fp32", f"{part} + {part} fp32",
                 f"{analytic['persistent_tensors']} / {analytic['persistent_elements']}",
                 analytic["persistent_elements"], "-", "-"]]
        for r in ranks:
            rows.append([f"measured rank {r['rank']}", f"tp {r['tp_rank']} dp {r['dp_rank']}", r["tp_rank_elements"],
                         f"{r['ds_tensor_elements']} {dtypes(r['ds_tensor_dtypes'])}",
                         f"{r['lp_flat_elements']} {dtypes(r['lp_flat_dtypes'])}",
                         f"{r['grad_buffer_elements']} {r['grad_buffer_dtype'].replace('torch.', '')}",
                         f"{r['fp32_elements']} {dtypes(r['fp32_dtypes'])}",
                         f"{r['adam_exp_avg_elements']} + {r['adam_exp_avg_sq_elements']} {dtypes(r['adam_dtypes'])}",
                         f"{r['persistent_tensors']} / {r['persistent_elements']}", r["whole_after_step_elements"],
                         f"{r['rss_after_init_bytes'] / 1e9:.2f} / {r['rss_bytes'] / 1e9:.2f} / "
                         f"{r['peak_rss_bytes'] / 1e9:.2f}",
                         "yes" if all(r[k] == part for k in ("ds_tensor_elements", "lp_flat_elements",
                                                             "grad_buffer_elements", "fp32_elements",
                                                             "adam_exp_avg_elements", "adam_exp_avg_sq_elements"))
                         and r["tp_rank_elements"] == analytic["tp_rank_elements"]
                         and r["persistent_elements"] == r["whole_after_step_elements"]
                         == analytic["persistent_elements"]
                         else "NO"])
        print_table(["", "rank", "TP-rank parameters (ds_numel sum)", "param partitions (ds_tensor)",
                     "optimizer flat lp partition", "grad partition buffer", "fp32 master partitions",
                     "Adam exp_avg + exp_avg_sq", "persistent tensors / elements", "held whole after the step",
                     "RSS after init / after step / peak (GB)",
                     "all equal analytic"], rows)
        measured = ranks[0]
        by = {"params": 2 * measured["ds_tensor_elements"],
              "grads": measured["grad_buffer_elements"] * (2 if "bfloat16" in measured["grad_buffer_dtype"] else 4),
              "master": 4 * measured["fp32_elements"],
              "adam": 4 * (measured["adam_exp_avg_elements"] + measured["adam_exp_avg_sq_elements"])}
        print(f"Rank 0 holds {mb(by['params'])} MB bf16 parameters + {mb(by['grads'])} MB gradient partition + "
              f"{mb(by['master'])} MB fp32 master + {mb(by['adam'])} MB Adam state = {mb(sum(by.values()))} MB "
              f"(analytic {mb(16 * part)} MB = 16 bytes x {part} elements), plus "
              f"{mb(2 * analytic['persistent_elements'])} MB of persistent parameters whole once gathered. "
              f"{measured['partition_stats']}\n")
    return out


# ----------------------------------------------------------------------------------------- communication
class CollectiveLog:
    """Wraps torch.distributed's collectives (module attributes, which the TP code looks up at call time) and
    records (phase, op, reduce op, group kind and size, dtype, elements, shape) of every call."""

    OPS = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "reduce_scatter",
           "broadcast", "all_to_all_single", "reduce")

    def __init__(self, groups: dict):
        self.groups = groups  # kind -> group object
        self.calls: list[dict] = []
        self.phase = "forward"
        self.saved: dict = {}

    def __enter__(self):
        import torch.distributed as dist

        for op in self.OPS:
            if hasattr(dist, op):
                self.saved[op] = getattr(dist, op)
                setattr(dist, op, self._wrap(op, self.saved[op]))
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        for op, fn in self.saved.items():
            setattr(dist, op, fn)

    def _wrap(self, op, fn):
        import torch.distributed as dist

        signature = inspect.signature(fn)

        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            arguments = bound.arguments
            group = arguments.get("group")
            tensor = arguments.get("tensor", arguments.get("input", arguments.get("input_tensor")))
            size = dist.get_world_size(group)
            kind = next((k for k, g in self.groups.items() if g is group), "world" if group is None else "other")
            elements = tensor.numel() * (size if op == "all_gather" else 1)
            reduce = str(arguments.get("op", "SUM")).split(".")[-1] if op in ("all_reduce", "reduce") else ""
            self.calls.append({"phase": self.phase, "op": op, "reduce": reduce.upper(), "group": kind,
                               "group_size": size, "dtype": str(tensor.dtype).replace("torch.", ""),
                               "element_bytes": tensor.element_size(), "elements": elements,
                               "shape": list(tensor.shape)})
            return fn(*args, **kwargs)

        return wrapper


def count_comm(cfg, tp: int, dp: int, batch: int, dtype, activation_checkpointing: bool) -> list[dict]:
    """Run one forward (model + CoCa loss) and backward on the meta device as rank 0 of (dp x tp)."""
    import torch

    from megacoca.losses import CoCaLoss

    model, dims = meta_parallel_model(cfg, tp, dp, activation_checkpointing=activation_checkpointing)
    model.to(dtype)
    images = torch.empty(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device="meta", dtype=dtype)
    text = torch.zeros(batch, cfg.context_length, dtype=torch.long, device="meta")
    with CollectiveLog({"tp": dims.tp_group, "dp": dims.dp_group}) as log:
        out = model(images, text)
        loss, _ = CoCaLoss()(out, dp_group=dims.dp_group)
        log.phase = "backward"
        loss.backward()
    return log.calls


def cmd_comm(args) -> dict:
    import torch
    import torch.distributed as dist

    from megacoca.config.flavors import get_flavor

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    act_bytes = torch.tensor([], dtype=dtype).element_size()
    results = {"env": environment(), "batch": args.batch, "dtype": args.dtype, "dp": args.dp, "cases": []}
    started = time.perf_counter()
    for flavor in args.flavors:
        # every text position kept: the meta forward cannot trim padding (a host sync), and full text is the max
        cfg = get_flavor(flavor, kernels="torch", trim_text_padding=False)
        for ac in ([False, True] if args.activation_checkpointing == "both" else
                   [args.activation_checkpointing == "on"]):
            for tp in args.tp:
                refused = refusal(cfg, tp)
                if refused:
                    results["cases"].append({"flavor": flavor, "tp": tp, "activation_checkpointing": ac,
                                             "refused": refused})
                    continue
                calls = count_comm(cfg, tp, args.dp, args.batch, dtype, ac)
                terms = analytic_comm(cfg, args.batch, act_bytes, ac)
                counted = collections.Counter()
                for c in calls:
                    if c["group"] == "tp":
                        assert c["op"] == "all_reduce", c  # training never gathers over TP (logits stay sharded)
                        counted[(c["phase"], c["reduce"], c["elements"], c["element_bytes"])] += 1
                expected = collections.Counter()
                for t in terms:
                    expected[(t["phase"], t["reduce"], t["elements"], t["element_bytes"])] += t["calls"]
                residual = collections.Counter(counted)
                residual.subtract(expected)
                residual = {k: v for k, v in residual.items() if v}
                explained = not residual
                tp_calls = [c for c in calls if c["group"] == "tp"]
                payload = sum(c["elements"] * c["element_bytes"] for c in tp_calls)
                analytic_payload = sum(t["calls"] * t["elements"] * t["element_bytes"] for t in terms)
                results["cases"].append({
                    "flavor": flavor, "tp": tp, "activation_checkpointing": ac,
                    "calls": {ph: sum(1 for c in tp_calls if c["phase"] == ph) for ph in ("forward", "backward")},
                    "analytic_calls": {ph: sum(t["calls"] for t in terms if t["phase"] == ph)
                                       for ph in ("forward", "backward")},
                    "elements": sum(c["elements"] for c in tp_calls), "payload_bytes": payload,
                    "analytic_payload_bytes": analytic_payload,
                    "ring_wire_bytes": 2 * (tp - 1) / tp * payload,
                    "residual": [[*k, v] for k, v in residual.items()], "residual_explained": explained,
                    "other_groups": collections.Counter(f"{c['group']} {c['op']} {c['reduce'] or '-'} {c['shape']} "
                                                        f"{c['dtype']}" for c in calls if c["group"] != "tp"),
                    "terms": terms if not any(c.get("terms") for c in results["cases"]) else None,
                    "counted_keys": [[*k, v] for k, v in sorted(counted.items())],
                })
    if dist.is_initialized():
        dist.destroy_process_group()
    results["seconds"] = round(time.perf_counter() - started, 1)

    print_header(f"tensor-parallel communication per rank for one micro-batch (B={args.batch}, {args.dtype} "
                 "activations, fp32 cross-entropy), counted on the meta device under the fake process group")
    rows = []
    for case in results["cases"]:
        if "refused" in case:
            rows.append([case["flavor"], case["tp"], "on" if case["activation_checkpointing"] else "off",
                         f"not possible: {case['refused']}"] + [""] * 8)
            continue
        diff = case["payload_bytes"] - case["analytic_payload_bytes"]
        rows.append([case["flavor"], case["tp"], "on" if case["activation_checkpointing"] else "off",
                     f"{case['calls']['forward']} / {case['calls']['backward']}",
                     f"{case['analytic_calls']['forward']} / {case['analytic_calls']['backward']}",
                     f"{case['elements'] / 1e6:,.2f}", mb(case["payload_bytes"]), mb(case["analytic_payload_bytes"]),
                     f"{diff:+,}", "exact" if case["residual_explained"] else f"UNEXPLAINED {case['residual']}", f"{2 * (case['tp'] - 1) / case['tp']:.3f}",
                     mb(case["ring_wire_bytes"])])
    print_table(["flavor", "TP", "AC", "all-reduces fwd / bwd counted", "analytic", "elements (M)",
                 "payload MB counted", "payload MB analytic", "diff (bytes)", "agreement",
                 "ring factor 2(t-1)/t", "ring wire MB per rank"], rows)
    others = next(c for c in results["cases"] if "refused" not in c)["other_groups"]
    print("Not tensor-parallel (the CoCa loss over the data-parallel group, the same at every TP): "
          + "; ".join(f"{k} x{v}" for k, v in others.items()) + "\n")

    first = next(c for c in results["cases"] if c.get("terms") is not None)
    cfg0 = get_flavor(first["flavor"])
    ac = "on" if first["activation_checkpointing"] else "off"
    print(f"Term by term, {first['flavor']} (TP={first['tp']}, AC {ac}, "
          f"B={args.batch}): image tokens {cfg0.image_tokens}, text {cfg0.context_length} + CLS, decoder "
          f"{cfg0.context_length - 1} positions, caption queries {cfg0.caption_queries}:\n")
    rows = []
    for t in first["terms"]:
        rows.append([t["phase"], t["what"], t["calls"], f"{t['elements']:,}", t["reduce"],
                     "fp32" if t["element_bytes"] == 4 and args.dtype != "fp32" else args.dtype,
                     mb(t["calls"] * t["elements"] * t["element_bytes"])])
    rows.append(["total", "", sum(t["calls"] for t in first["terms"]), "", "", "",
                 mb(sum(t["calls"] * t["elements"] * t["element_bytes"] for t in first["terms"]))])
    print_table(["phase", "collective (all-reduce on the TP group)", "calls", "elements per call", "op", "dtype",
                 "MB"], rows)
    print("Counted calls by (phase, reduce op, elements, bytes/element) -> count, for the same case:\n")
    print_table(["phase", "op", "elements per call", "bytes/element", "calls"],
                [[k[0], k[1], f"{k[2]:,}", k[3], k[4]] for k in first["counted_keys"]])
    return results


# ------------------------------------------------------------------------------------------------ step time

class _FixedLoader:
    """`count` pre-built micro-batches of this dp rank, cycled (no data work inside the timed steps)."""

    def __init__(self, cfg, micro: int, dp_rank: int, dp_size: int, count: int = 4):
        from memory_data import global_batch

        self.batches = [global_batch((k * dp_size + dp_rank) * micro, micro, cfg) for k in range(count)]
        self.skipped = {}

    def __iter__(self):
        while True:
            yield from self.batches

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _steptime_rank(rank, world_size, tp, cfg_dict, global_batch, warmup, steps, ds_name, run_dir, threshold):
    import logging

    import deepspeed
    import torch.distributed as dist

    from megacoca.config.model import CoCaConfig
    from megacoca.config.recipes import build_config
    from megacoca.parallel.dims import ParallelDims
    from megacoca.trainer import Trainer

    deepspeed.utils.logger.setLevel(logging.WARNING)
    dp = world_size // tp
    micro = global_batch // dp
    job = build_config(overrides=[
        f"parallel.deepspeed_config={ds_name}", f"parallel.tp={tp}", f"schedule.steps={warmup + steps}",
        f"schedule.global_batch_size={global_batch}", f"schedule.micro_batch_size={micro}",
        "schedule.warmup_steps=1", f"logging.run_dir={run_dir}", "logging.tensorboard=false",
        "checkpoint.save_final=false"]
        + ([] if threshold is None else
           [f"parallel.deepspeed_overrides.zero_optimization.stage3_param_persistence_threshold={threshold}"]))
    job.model.overrides = cfg_dict
    cfg = CoCaConfig.from_dict(cfg_dict)
    dims = ParallelDims.from_config(job.parallel, world_size).build()
    trainer = Trainer(job, _FixedLoader(cfg, micro, dims.dp_rank, dims.dp_size), dims=dims, logger=_silent_logger())
    batches = trainer._batches()
    times, losses = [], []
    for _ in range(warmup + steps):
        dist.barrier()
        started = time.perf_counter()
        result = trainer.train_step(batches)
        times.append(time.perf_counter() - started)
        losses.append(float(result["sums"][0]))
    partition = trainer.partition.describe() if trainer.partition is not None else ""
    trainer.close()
    return {"times": times[warmup:], "losses": losses, "partition": partition}


def cmd_steptime(args) -> dict:
    from dist_harness import run_ranks

    from megacoca.config.flavors import get_flavor
    from megacoca.models.coca import CoCa

    cfg = get_flavor(args.flavor, kernels="torch")
    import torch

    with torch.device("meta"):
        params = sum(p.numel() for p in CoCa(cfg).parameters())
    layouts = {"TP=2": 2, "DP=2": 1}
    results = {"env": environment(), "flavor": args.flavor, "params": params, "global_batch": args.batch,
               "rounds": [], "ds_config": args.ds_config}
    load_before = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            order = list(layouts.items()) if round_index % 2 == 0 else list(layouts.items())[::-1]
            for name, tp in order:
                launched = time.perf_counter()
                ranks = run_ranks(_steptime_rank, 2, tmp, tp, cfg.to_dict(), args.batch, args.warmup, args.steps,
                                  args.ds_config, os.path.join(tmp, f"run_{name}_{round_index}"),
                                  args.persistence_threshold, timeout=args.timeout)
                per_step = [max(r["times"][i] for r in ranks) for i in range(args.steps)]  # the slower rank
                results["rounds"].append({"layout": name, "round": round_index, "median_s": statistics.median(per_step),
                                          "steps_s": per_step, "launch_s": time.perf_counter() - launched,
                                          # the mean over ranks of the per-rank losses is the global-batch loss
                                          # in both layouts (dp ranks: local losses; tp ranks: equal copies)
                                          "first_loss": statistics.mean(r["losses"][0] for r in ranks),
                                          "partition": ranks[0]["partition"],
                                          "load": [round(x, 2) for x in os.getloadavg()]})
    wall = time.perf_counter() - started
    load_after = [round(x, 2) for x in os.getloadavg()]
    results.update(wall_seconds=round(wall, 1), load_before=load_before, load_after=load_after)

    threshold = "" if args.persistence_threshold is None else \
        f", stage3_param_persistence_threshold={args.persistence_threshold}"
    print_header(f"step time on 2 CPU ranks: TP=2 against DP=2, {args.flavor} ({params / 1e6:.2f}M params, kernels "
                 f"torch), global batch {args.batch}, {args.ds_config}{threshold}")
    print(f"- {args.rounds} rounds x 2 layouts, alternating (each a fresh 2-rank launch, {args.warmup} untimed + "
          f"{args.steps} timed steps, 1 thread per rank); wall {wall:.1f} s; load average before {load_before}, "
          f"after {load_after}\n")
    rows = [[r["round"], r["layout"], f"{r['median_s'] * 1e3:.1f}", " ".join(f"{t * 1e3:.0f}" for t in r["steps_s"]),
             f"{r['first_loss']:.4f}", r["load"]] for r in results["rounds"]]
    print_table(["round", "layout", "median step (ms)", "steps (ms)", "first-step loss (global batch)",
                 "load after"], rows)
    medians = {name: statistics.median(r["median_s"] for r in results["rounds"] if r["layout"] == name)
               for name in layouts}
    results["medians_s"] = medians
    results["ratio_tp_over_dp"] = medians["TP=2"] / medians["DP=2"]
    print_table(["layout", "median of round medians (ms)", "samples/s"],
                [[name, f"{m * 1e3:.1f}", f"{args.batch / m:.1f}"] for name, m in medians.items()])
    print(f"TP=2 / DP=2 step time: **{results['ratio_tp_over_dp']:.2f}x**\n")
    for name in layouts:
        partition = next(r["partition"] for r in results["rounds"] if r["layout"] == name)
        print(f"- {name}: {partition}")
    print()
    return results


# ------------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    sub = parser.add_subparsers(dest="command", required=True)

    memory = sub.add_parser("memory", parents=[common],
                            help="per-rank parameter/gradient/optimizer memory, TP x ZeRO-3")
    memory.add_argument("--flavors", nargs="+", default=list(PAPER_FLAVORS))
    memory.add_argument("--tp", nargs="+", type=int, default=[1, 2, 4, 8])
    memory.add_argument("--dp", type=int, default=64)
    memory.add_argument("--ds-config", default="zero3_bf16")
    memory.add_argument("--measure", nargs="*", default=["coca_base"],
                        help="flavors to measure at TP=2 x DP=2 on 4 gloo CPU ranks (none: --measure with no name)")
    memory.add_argument("--timeout", type=float, default=600)

    comm = sub.add_parser("comm", parents=[common],
                          help="tensor-parallel collectives of one forward+backward, counted vs analytic")
    comm.add_argument("--flavors", nargs="+", default=list(PAPER_FLAVORS))
    comm.add_argument("--tp", nargs="+", type=int, default=[2, 4, 8])
    comm.add_argument("--dp", type=int, default=64)
    comm.add_argument("--batch", type=int, default=8)
    comm.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    comm.add_argument("--activation-checkpointing", choices=["off", "on", "both"], default="both")

    steptime = sub.add_parser("steptime", parents=[common], help="TP=2 vs DP=2 step time on 2 CPU ranks")
    steptime.add_argument("--flavor", default="coca_tiny")
    steptime.add_argument("--batch", type=int, default=32, help="global batch (both layouts)")
    steptime.add_argument("--rounds", type=int, default=4)
    steptime.add_argument("--warmup", type=int, default=2)
    steptime.add_argument("--steps", type=int, default=8)
    steptime.add_argument("--ds-config", default="zero3_fp32")
    steptime.add_argument("--persistence-threshold", type=int, default=None,
                          help="override stage3_param_persistence_threshold (0: ZeRO-3 partitions every tensor)")
    steptime.add_argument("--timeout", type=float, default=300)

    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = {"memory": cmd_memory, "comm": cmd_comm, "steptime": cmd_steptime}[args.command](args)
    print(f"({args.command}: {time.perf_counter() - started:.1f} s wall)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1, default=str)
    return 0



def _silent_logger():
    """The Trainer's logger, switched off (a benchmark prints its own report)."""
    from megacoca.metrics.logger import MetricsLogger

    return MetricsLogger("", enabled=False)


if __name__ == "__main__":
    sys.exit(main())

