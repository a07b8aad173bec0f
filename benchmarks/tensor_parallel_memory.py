"""benchmarks/tensor_parallel.py memory: per-rank parameter, gradient and optimizer memory under TP x ZeRO-3.

(a) analytic, by formula from the config; (b) from the real shard shapes of the project's meta-device build under
the fake process group; (c) measured on 4 gloo CPU ranks. benchmarks/tensor_parallel.py's docstring has the
details; `python benchmarks/tensor_parallel.py memory` runs it.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(REPO, "tests", "distributed")
for _path in (REPO, HARNESS):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from bench_report import environment, mb, millions, print_header, print_table  # noqa: E402

from megacoca.profiling.collectives import meta_parallel_model  # noqa: E402


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
