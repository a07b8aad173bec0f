"""Tensor parallelism (issue 7): per-rank memory, communication per step, and step time on CPU ranks.

Three subcommands (memory's code is in benchmarks/tensor_parallel_memory.py); each prints markdown tables with the
command line, torch/DeepSpeed versions, CPU count and load average, and writes nothing else unless `--json PATH` is
given.

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
  process group (rank 0 of 64 x tp; megacoca.profiling.collectives, which tests/unit/plan/test_comm.py runs on tiny
  CoCas). Counted calls on the tensor-parallel group are compared, key by key, with the planner's count
  (megacoca.plan.comm.analytic_comm). bf16 activations (the zero3_bf16 training dtype), the vocabulary-parallel
  cross-entropy in fp32; every text position kept (no padding to trim). Counted and analytic agree call for call
  and element for element. With activation checkpointing the blocks' forward all-reduces run again in backward,
  except each block's last one (torch's checkpoint early stop).

steptime
  coca_tiny (kernels "torch") on 2 CPU ranks, ZeRO-3 fp32 (ds_configs/zero3_fp32.json as shipped), the same global
  batch: TP=2 (dp=1) against DP=2 (tp=1), through the Trainer's own `train_step`, in alternating fresh launches;
  the median step of each launch, then the median over launches.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(REPO, "tests", "distributed")
for _path in (REPO, HARNESS):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from bench_report import environment, mb, print_header, print_table  # noqa: E402
from tensor_parallel_memory import cmd_memory, refusal  # noqa: E402

from megacoca.plan.comm import analytic_comm  # noqa: E402  (the planner's; checked here against the meta count)
from megacoca.profiling.collectives import analytic_counts, count_collectives, tp_counts  # noqa: E402

PAPER_FLAVORS = ("coca_base", "coca_large", "coca_giant")


# ----------------------------------------------------------------------------------------- communication
def _comm_case(cfg, flavor: str, tp: int, ac: bool, args, dtype, act_bytes: int, with_terms: bool) -> dict:
    """One (flavor, tp, activation checkpointing): the collectives counted on the meta device against
    analytic_comm's terms (megacoca.profiling.collectives keys both alike)."""
    calls = count_collectives(cfg, tp, args.dp, args.batch, dtype, ac)
    terms = analytic_comm(cfg, args.batch, act_bytes, ac)
    tp_calls = [c for c in calls if c["group"] == "tp"]
    for c in tp_calls:
        assert c["op"] == "all_reduce", c  # training never gathers over TP (logits stay sharded)
    counted = tp_counts(calls)
    residual = collections.Counter(counted)
    residual.subtract(analytic_counts(terms))
    residual = {k: v for k, v in residual.items() if v}
    payload = sum(c["elements"] * c["element_bytes"] for c in tp_calls)
    return {
        "flavor": flavor, "tp": tp, "activation_checkpointing": ac,
        "calls": {ph: sum(1 for c in tp_calls if c["phase"] == ph) for ph in ("forward", "backward")},
        "analytic_calls": {ph: sum(t["calls"] for t in terms if t["phase"] == ph) for ph in ("forward", "backward")},
        "elements": sum(c["elements"] for c in tp_calls), "payload_bytes": payload,
        "analytic_payload_bytes": sum(t["calls"] * t["elements"] * t["element_bytes"] for t in terms),
        "ring_wire_bytes": 2 * (tp - 1) / tp * payload,
        "residual": [[*k, v] for k, v in residual.items()], "residual_explained": not residual,
        "other_groups": collections.Counter(f"{c['group']} {c['op']} {c['reduce'] or '-'} {c['shape']} "
                                            f"{c['dtype']}" for c in calls if c["group"] != "tp"),
        "terms": terms if with_terms else None,
        "counted_keys": [[*k, v] for k, v in sorted(counted.items())],
    }


def _print_comm_cases(args, results: dict) -> None:
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
                     f"{diff:+,}", "exact" if case["residual_explained"] else f"UNEXPLAINED {case['residual']}",
                     f"{2 * (case['tp'] - 1) / case['tp']:.3f}", mb(case["ring_wire_bytes"])])
    print_table(["flavor", "TP", "AC", "all-reduces fwd / bwd counted", "analytic", "elements (M)",
                 "payload MB counted", "payload MB analytic", "diff (bytes)", "agreement",
                 "ring factor 2(t-1)/t", "ring wire MB per rank"], rows)
    others = next(c for c in results["cases"] if "refused" not in c)["other_groups"]
    print("Not tensor-parallel (the CoCa loss over the data-parallel group, the same at every TP): "
          + "; ".join(f"{k} x{v}" for k, v in others.items()) + "\n")


def _print_comm_terms(args, results: dict) -> None:
    from megacoca.config.flavors import get_flavor

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
                with_terms = not any(c.get("terms") for c in results["cases"])
                results["cases"].append(_comm_case(cfg, flavor, tp, ac, args, dtype, act_bytes, with_terms))
    if dist.is_initialized():
        dist.destroy_process_group()
    results["seconds"] = round(time.perf_counter() - started, 1)
    _print_comm_cases(args, results)
    _print_comm_terms(args, results)
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

