"""Pipeline parallelism PP=2: megacoca's own pipeline against DeepSpeed's PipelineModule, on 2 CPU ranks.

What: the same small CoCa (coca_tiny, 64px / patch 8, deepened by default to 8 ViT blocks and 3 text + 3 decoder
layers (`--model-set`, 3.44M params; ~0.3 s per step at m=2 on a loaded 2-core box, so ~1 s at m=8 by
extrapolation), kernels "torch", fp32), split
over the same 2 stages at the same boundary (megacoca's FLOP-balanced split,
`megacoca.parallel.pipeline.split.split_stages`: ViT blocks 0-5 | 6-7 + text side), trained with AdamW (same
hyper-parameters, same param groups, same lr schedule, grad clipping 1.0) on the same pre-built micro-batches, by
- megacoca: the Trainer with `parallel.pp=2` (megacoca/parallel/pipeline: 1F1B, async sends), one DeepSpeed engine
  per stage, under ZeRO-1 (`zero0_fp32` + `zero_optimization.stage=1`) and ZeRO-3 (`zero3_fp32`,
  `stage3_param_persistence_threshold=0`), each with text-ahead off (`parallel.text_ahead=0`) and auto
  (`parallel.text_ahead=-1`);
- DeepSpeed: `deepspeed.pipe.PipelineModule` + `PipelineEngine` (its own 1F1B `TrainSchedule`, blocking sends),
  ZeRO-1 (`--ds-zero`; DeepSpeed refuses ZeRO-2/3 under its pipeline). CoCa is written as a linear chain of layers
  that pass tuples: layer 0 (images, text) -> (patch-embedded hidden, text), one layer per ViT block (hidden, text)
  -> (hidden, text), and a last layer that runs the image pooler, the text tower, the multimodal decoder and the
  heads and returns the scalar CoCa loss (no `loss_fn`: the engine then takes the last layer's output as the loss;
  the layers are in benchmarks/deepspeed_pipeline_chain.py). The text travels from stage 0 as an int64 tensor (no
  gradient asked for it). A PipelineModule subclass sets the layer partition explicitly so that stage 0 holds
  `vision.embed` + exactly megacoca's stage-0 ViT blocks. The layers wrap the modules of one CoCa built as the
  Trainer builds its model (`seed_everything(job.seed)`, `CoCa(cfg)`), so both sides start from the same weights:
  the script checks megacoca's initial ZeRO-1 stage weights against that CoCa's by name and prints the first losses
  of every row.
for m micro-batches per step (`--micro-batches`, default 2 4 8) of `--micro-batch-size` samples (default 8).

How measured: both ranks are forked once from a forkserver that imported torch and DeepSpeed (megacoca.launch.ranks:
gloo, FileStore rendezvous, 1 thread per rank, OMP_NUM_THREADS=1), and run every configuration in turn (for each m,
all sides; the order of the sides alternates from one m to the next). Each configuration builds its engine(s), runs
`--warmup` untimed steps, then `--steps` timed ones. Each step starts after a barrier; its time is the wall time of
one call (`Trainer.train_step` / `PipelineEngine.train_batch`: the whole optimizer step, micro-batches already in
memory) on the slower rank; the table gives the median over the timed steps. Idle (bubble) fraction of a stage = the
time it spent blocked on its neighbour / the time of its schedule, per step, median over the timed steps:
- megacoca: `PipelineSchedule.last_wait_s / last_step_s` (receives and the end-of-step wait for the async sends);
- DeepSpeed: the time inside its SendActivation / RecvActivation / SendGrad / RecvGrad instructions (its sends
  block) / the time of `_exec_schedule` (both include the optimizer step, neither the final loss broadcast).
The textbook 1F1B idle fraction (p-1)/(m+p-1) assumes equal stages and free communication.

    .venv/bin/python benchmarks/pipeline_vs_deepspeed.py                       # m = 2 4 8, all sides
    .venv/bin/python benchmarks/pipeline_vs_deepspeed.py --micro-batches 2 --steps 2 --warmup 1   # smoke run
    .venv/bin/python benchmarks/pipeline_vs_deepspeed.py --sides deepspeed megacoca-z1 --steps 10

Not a test: the only checks are sanity ones (every rank finishes; the first losses are printed next to each other).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported anywhere (the forkserver inherits it)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench_report import print_table  # noqa: E402
from deepspeed_pipeline_chain import deepspeed_layers, fixed_split_pipeline_module, instrument_deepspeed  # noqa: E402

from megacoca.launch.ranks import RankFailure, run_ranks  # noqa: E402

PP = 2
DEFAULT_MODEL_SET = ("vision_layers=8", "text_layers=3", "decoder_layers=3")
SIDES = {  # name -> (kind, ZeRO stage (None: --ds-zero), text-ahead)
    "deepspeed": ("deepspeed", None, None),
    "megacoca-z1": ("megacoca", 1, 0),
    "megacoca-z1-ta": ("megacoca", 1, -1),
    "megacoca-z3": ("megacoca", 3, 0),
    "megacoca-z3-ta": ("megacoca", 3, -1),
    "megacoca-z3-kg": ("megacoca", "3 kept gathered", 0),  # parallel.pipeline_keep_gathered
}
ALIASES = {"all": list(SIDES), "megacoca": [s for s in SIDES if s.startswith("megacoca")]}
PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "deepspeed", "deepspeed.pipe", "megacoca.trainer",
           "megacoca.models.coca", "megacoca.losses", "megacoca.schedules.pipeline",
           "deepspeed.runtime.zero.muon.muon_optimizer",  # torch.compile at import: pulls in inductor
           "deepspeed.runtime.zero.stage3", "deepspeed.runtime.zero.stage_1_and_2"]


# ------------------------------------------------------------------------------------------------ model, data
def model_config(args):
    from megacoca.config.flavors import get_flavor

    overrides = {"kernels": "torch"}
    for item in args.model_set:
        key, _, value = item.partition("=")
        import yaml

        overrides[key] = yaml.safe_load(value)
    return get_flavor(args.flavor, **overrides)


def sample(index: int, cfg):
    """One deterministic (image, caption) pair: bos, random tokens, eos, pads (as tests/distributed/memory_data)."""
    import torch

    gen = torch.Generator().manual_seed(1000 + index)
    image = torch.randn(cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)
    length = int(torch.randint(3, cfg.context_length + 1, (1,), generator=gen))
    text = torch.full((cfg.context_length,), cfg.pad_id, dtype=torch.long)
    text[:length] = torch.randint(3, cfg.vocab_size, (length,), generator=gen)
    text[0], text[length - 1] = 1, 2
    return image, text


def micro_batches(cfg, count: int, size: int) -> list[dict]:
    import torch

    out = []
    for k in range(count):
        images, texts = zip(*(sample(k * size + i, cfg) for i in range(size)))
        out.append({"images": torch.stack(images), "text": torch.stack(texts)})
    return out


class _ListLoader:
    """The Trainer's loader interface over pre-built micro-batches (the benchmark feeds train_step itself)."""

    def __init__(self, batches):
        self.batches, self.skipped = batches, {}

    def __iter__(self):
        return iter(self.batches)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass



def job_config(args, m: int, run_dir: str, zero: int, text_ahead: int):
    from megacoca.config.recipes import build_config

    keep_gathered = zero == "3 kept gathered"
    zero = 3 if keep_gathered else zero
    base = "zero3_fp32" if zero == 3 else "zero0_fp32"
    overrides = [f"parallel.pipeline_keep_gathered={keep_gathered}",
        f"parallel.deepspeed_config={base}", f"parallel.pp={PP}", f"parallel.text_ahead={text_ahead}",
        f"schedule.steps={args.warmup + args.steps}", f"schedule.global_batch_size={args.micro_batch_size * m}",
        f"schedule.micro_batch_size={args.micro_batch_size}", "schedule.warmup_steps=1", "optim.lr=1e-3",
        "optim.grad_clip=1.0", f"logging.run_dir={run_dir}", "logging.tensorboard=false", "logging.log_every=1",
        "checkpoint.save_final=false",
        "parallel.deepspeed_overrides.zero_optimization.stage3_param_persistence_threshold=0"]
    if zero in (1, 2):
        overrides.append(f"parallel.deepspeed_overrides.zero_optimization.stage={zero}")
    job = build_config(overrides=overrides)
    job.model.overrides = model_config(args).to_dict()
    return job


# ------------------------------------------------------------------------------------------------- one rank
def _release(*objects):
    import gc

    for obj in objects:
        destroy = getattr(obj, "destroy", None)
        if destroy is not None:
            try:
                destroy()
            except Exception:  # noqa: BLE001 - cleanup only
                pass
    gc.collect()


def _run_megacoca(args, m, zero, text_ahead, dims, data, reference, tmp, notes):
    import torch.distributed as dist

    from megacoca.trainer import Trainer

    job = job_config(args, m, os.path.join(tmp, f"mc_m{m}_z{str(zero).replace(' ', '_')}_ta{text_ahead}"), zero,
                     text_ahead)
    trainer = Trainer(job, _ListLoader(data), dims=dims, logger=_silent_logger())
    runner = trainer.schedule
    info = {"stage": dims.pp_rank, "text_ahead": runner.text_ahead, "split": trainer.pipeline_split.describe(),
            "zero": zero}
    if zero not in (3, "3 kept gathered") and "weights" not in notes:  # megacoca's initial stage weights against the DeepSpeed side's CoCa
        state = reference.state_dict()
        diffs = [float((param.detach().float() - state[name].float()).abs().max())
                 for name, param in trainer.engine.module.named_parameters()]
        notes["weights"] = {"tensors": len(diffs), "max_abs_diff": max(diffs) if diffs else float("nan")}
    batches = iter(data)
    steps = []
    for _ in range(args.warmup + args.steps):
        dist.barrier()
        began = time.perf_counter()
        result = trainer.train_step(batches)
        wall = time.perf_counter() - began
        steps.append({"wall": wall, "wait": runner.last_wait_s, "window": runner.last_step_s,
                      "loss": float(result["sums"][0]) / m})
    _release(trainer.engine)
    del trainer, runner
    _release()
    return info, steps


def _run_deepspeed(args, m, zero, data, reference, tmp):
    import deepspeed
    import torch
    import torch.distributed as dist

    from megacoca.config.deepspeed import build_deepspeed_config
    from megacoca.losses import CoCaLoss
    from megacoca.parallel.pipeline.split import split_stages
    from megacoca.optim import lr_lambda, param_groups

    job = job_config(args, m, os.path.join(tmp, f"ds_m{m}_z{zero}"), zero, 0)
    cfg = model_config(args)
    split = split_stages(cfg, PP, job.parallel.pipeline_split)
    model = copy.deepcopy(reference)  # = seed_everything(job.seed); CoCa(cfg): the Trainer's initial weights
    layers = deepspeed_layers(model, CoCaLoss(job.optim.contrastive_weight, job.optim.caption_weight))
    first = 1 + len(split.blocks[0])  # embed + megacoca's stage-0 ViT blocks
    parts = [0, first, len(layers)]
    pipe = fixed_split_pipeline_module(layers, parts)
    local = {id(p) for p in pipe.parameters()}
    groups = [{"params": [p for p in g["params"] if id(p) in local], "weight_decay": g["weight_decay"]}
              for g in param_groups(model, job.optim.weight_decay)]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=job.optim.lr, betas=tuple(job.optim.betas),
                                  eps=job.optim.eps)
    ds_config = build_deepspeed_config(job, dp_size=1)
    engine, _, _, _ = deepspeed.initialize(
        model=pipe, optimizer=optimizer, config=ds_config, dist_init_required=False,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(job.schedule)))
    stats = instrument_deepspeed(engine)
    info = {"stage": engine.stage_id, "parts": parts, "zero": zero, "local_layers": [type(l).__name__ for l in
                                                                                       pipe.forward_funcs]}
    batches = iter([((b["images"], b["text"]), None) for b in data])
    steps = []
    for _ in range(args.warmup + args.steps):
        dist.barrier()
        began = time.perf_counter()
        loss = engine.train_batch(data_iter=batches)
        wall = time.perf_counter() - began
        steps.append({"wall": wall, "wait": stats["wait"], "window": stats["window"], "loss": float(loss)})
    _release(engine)
    del engine, pipe, model, layers, optimizer
    _release()
    return info, steps


def _rank_main(rank, world_size, args):
    """One rank (its gloo group made by megacoca.launch.ranks): every configuration in turn."""
    os.dup2(2, 1)  # the ranks' (and DeepSpeed's) prints go to stderr; stdout carries only the report
    import logging

    import deepspeed
    import torch

    from megacoca.config.recipes import build_config  # noqa: F401 - import errors surface here
    from megacoca.models.coca import CoCa
    from megacoca.parallel.dims import ParallelDims
    from megacoca.optim import seed_everything

    deepspeed.utils.logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, dist_init_required=False)

    cfg = model_config(args)
    total_steps = args.warmup + args.steps
    pool = micro_batches(cfg, max(args.micro_batches) * total_steps, args.micro_batch_size)
    probe = job_config(args, max(args.micro_batches), "/tmp", 1, 0)
    seed_everything(probe.seed)
    reference = CoCa(cfg)  # the CoCa the Trainer builds for this seed; the DeepSpeed side's layers copy it
    dims = None
    if any(SIDES[s][0] == "megacoca" for s in args.sides):
        dims = ParallelDims.from_config(probe.parallel, world_size).build()

    out = {"rank": rank, "rows": [], "notes": {}, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "deepspeed": deepspeed.__version__,
           "params": reference.num_params()}
    with tempfile.TemporaryDirectory(prefix="ppbench_") as tmp:
        for index, m in enumerate(args.micro_batches):
            data = pool[:m * total_steps]
            order = args.sides if index % 2 == 0 else args.sides[::-1]
            for side in order:
                kind, zero, text_ahead = SIDES[side]
                began = time.perf_counter()
                if kind == "deepspeed":
                    info, steps = _run_deepspeed(args, m, args.ds_zero, data, reference, tmp)
                else:
                    info, steps = _run_megacoca(args, m, zero, text_ahead, dims, data, reference, tmp, out["notes"])
                out["rows"].append({"side": side, "m": m, "info": info, "steps": steps,
                                    "config_s": time.perf_counter() - began,
                                    "load": [round(x, 2) for x in os.getloadavg()]})
                if rank == 0:
                    timed = [s["wall"] for s in steps[args.warmup:]]
                    print(f"[ppbench] m={m} {side}: median rank-0 step {statistics.median(timed):.3f} s "
                          f"({time.perf_counter() - began:.1f} s incl. build) load {out['rows'][-1]['load']}",
                          file=sys.stderr, flush=True)
    return out


def run_two_ranks(args) -> list[dict]:
    """_rank_main on PP ranks (megacoca.launch.ranks: forked from a forkserver that imported PRELOAD, FileStore
    rendezvous, one thread each)."""
    # The forkserver starts with the first rank and keeps this stdout: point it at stderr meanwhile, so its imports'
    # messages (and the ranks') stay out of the report.
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        return run_ranks(_rank_main, PP, args, timeout=args.timeout, env={"OMP_NUM_THREADS": "1"}, preload=PRELOAD)
    except RankFailure as failure:
        raise SystemExit(f"benchmark failed\n{failure}") from None
    finally:
        os.dup2(saved, 1)
        os.close(saved)


# ------------------------------------------------------------------------------------------------ reporting
def side_label(side: str, info: dict, ds_zero: int) -> tuple[str, str, str]:
    kind, zero, text_ahead = SIDES[side]
    if kind == "deepspeed":
        return "DeepSpeed PipelineModule", f"ZeRO-{ds_zero}", "n/a"
    ahead = "0 (off)" if text_ahead == 0 else f"auto ({info['text_ahead']})"
    return "megacoca pipeline", f"ZeRO-{zero}", ahead


def report(args, ranks: list[dict], load_before, wall_s: float) -> None:
    r0 = ranks[0]
    command = " ".join(shlex.quote(x) for x in [sys.executable] + sys.argv)
    cfg = model_config(args)
    print("### Pipeline parallelism PP=2 on 2 CPU ranks: megacoca's pipeline vs DeepSpeed's PipelineModule\n")
    print(f"- command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} {command}` (cwd {os.getcwd()})")
    print(f"- {datetime.datetime.now().astimezone().isoformat(timespec='seconds')} | torch {r0['torch']} | "
          f"deepspeed {r0['deepspeed']} | python {platform.python_version()} | {os.cpu_count()} CPUs "
          f"({platform.machine()}), gloo, {r0['threads']} thread per rank, no GPU used")
    print(f"- load average before {load_before}, after {[round(x, 2) for x in os.getloadavg()]}; wall {wall_s:.1f} s "
          "(imports, builds and all steps)")
    print(f"- model: {args.flavor} with {' '.join(args.model_set) or 'no overrides'} ({r0['params'] / 1e6:.2f}M "
          f"params, {cfg.image_size}px / patch {cfg.patch_size}, "
          f"{cfg.vision_layers} ViT blocks, {cfg.text_layers} text + {cfg.decoder_layers} decoder layers, width "
          f"{cfg.vision_width}/{cfg.text_width}, vocab "
          f"{cfg.vocab_size}, context {cfg.context_length}, kernels {cfg.kernels}), fp32, AdamW lr 1e-3, clip 1.0")
    mc = next((row for row in r0["rows"] if SIDES[row["side"]][0] == "megacoca"), None)
    ds = next((row for row in r0["rows"] if SIDES[row["side"]][0] == "deepspeed"), None)
    if mc is not None:
        print(f"- megacoca {mc['info']['split']}")
    if ds is not None:
        layers = {r["rank"]: next(row for row in r["rows"] if row["side"] == "deepspeed")["info"] for r in ranks}
        print(f"- DeepSpeed PipelineModule parts {ds['info']['parts']}: "
              + "; ".join(f"stage {info['stage']}: {', '.join(info['local_layers'])}" for info in layers.values()))
    print(f"- micro-batch size {args.micro_batch_size}; per row {args.warmup} untimed warm-up + {args.steps} timed "
          "steps; step time = wall time of one optimizer step on the slower rank, after a barrier")
    weights = r0["notes"].get("weights")
    weights1 = ranks[1]["notes"].get("weights")
    if weights is not None and weights1 is not None:
        print(f"- initial weights: megacoca's ZeRO-1 stage parameters vs the CoCa the DeepSpeed layers wrap, by name: "
              f"stage 0 max |diff| {weights['max_abs_diff']:.3g} over {weights['tensors']} tensors, stage 1 "
              f"{weights1['max_abs_diff']:.3g} over {weights1['tensors']} tensors")
    print()

    def stage_idle(row_index: int, stage: int) -> list[float]:
        rank = next(r for r in ranks if r["rows"][row_index]["info"]["stage"] == stage)
        steps = rank["rows"][row_index]["steps"][args.warmup:]
        return [s["wait"] / s["window"] if s["window"] > 0 else float("nan") for s in steps]

    table, details, first_losses = [], [], {}
    medians = {}
    for i, row in enumerate(r0["rows"]):
        walls = [max(r["rows"][i]["steps"][j]["wall"] for r in ranks) for j in range(len(row["steps"]))]
        timed = walls[args.warmup:]
        medians[(row["side"], row["m"])] = statistics.median(timed)
        row["_walls"] = walls
    for i, row in enumerate(r0["rows"]):
        m, side = row["m"], row["side"]
        median = medians[(side, m)]
        base = medians.get(("deepspeed", m))
        idle = [stage_idle(i, s) for s in range(PP)]
        losses = [s["loss"] for s in row["steps"]]
        first_losses.setdefault(m, []).append((side, row["info"], losses[0]))
        name, zero, ahead = side_label(side, row["info"], args.ds_zero)
        table.append([m, name, zero, ahead, f"{median:.3f}", "-" if base is None else f"{median / base:.2f}x",
                      f"{args.micro_batch_size * m / median:.1f}",
                      f"{statistics.median(idle[0]):.3f}", f"{statistics.median(idle[1]):.3f}",
                      f"{(PP - 1) / (m + PP - 1):.3f}", f"{losses[0]:.6f}"])
        details.append([m, side, " ".join(f"{w:.3f}" for w in row["_walls"][:args.warmup]),
                        " ".join(f"{w:.3f}" for w in row["_walls"][args.warmup:]),
                        " ".join(f"{x:.3f}" for x in idle[0]), " ".join(f"{x:.3f}" for x in idle[1]),
                        " ".join(f"{x:.5f}" for x in losses), f"{row['config_s']:.1f}", row["load"]])
    order = {side: k for k, side in enumerate(SIDES)}  # rows in a fixed order per m, whatever order they ran in
    keys = [(row["m"], order[row["side"]]) for row in r0["rows"]]
    table = [t for _, t in sorted(zip(keys, table), key=lambda pair: pair[0])]
    details = [d for _, d in sorted(zip(keys, details), key=lambda pair: pair[0])]
    print_table(["m", "side", "ZeRO", "text-ahead", "median step (s)", "vs DeepSpeed pipe", "samples/s",
                 "stage-0 idle", "stage-1 idle", "1F1B (p-1)/(m+p-1)", "first loss"], table)
    print("Idle = time blocked on the neighbour stage / the stage's schedule time, median over the timed steps "
          "(megacoca: receives + the end-of-step wait for its async sends; DeepSpeed: its blocking send/recv "
          "instructions).\n")
    print("First losses (step 1, mean over the m micro-batches, same data and same initial weights on every row):\n")
    for m, entries in first_losses.items():
        entries = sorted(entries, key=lambda entry: order[entry[0]])
        ds_loss = next((loss for side, _, loss in entries if side == "deepspeed"), None)
        parts = []
        for side, info, loss in entries:
            diff = "" if ds_loss is None or side == "deepspeed" else f" (vs DeepSpeed {loss - ds_loss:+.2e})"
            parts.append(f"{side} {loss:.6f}{diff}")
        print(f"- m={m}: " + "; ".join(parts))
    print("\nEvery per-step figure (step times = the slower rank; idle per stage; losses include the warm-up steps):\n")
    print_table(["m", "side", "warm-up step (s)", "timed steps (s)", "stage-0 idle per step",
                 "stage-1 idle per step", "loss per step", "row wall (s)", "load after"], details)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[2, 4, 8],
                        help="micro-batches per step (m), one row set each (default 2 4 8)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per row (default 6)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per row before them (default 2)")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="samples per micro-batch (default 8)")
    parser.add_argument("--sides", nargs="+", default=["all"],
                        help=f"rows to run: {', '.join(SIDES)}, or 'megacoca' / 'all' (default all)")
    parser.add_argument("--ds-zero", type=int, default=1, choices=[0, 1],
                        help="ZeRO stage of DeepSpeed's pipeline (it refuses 2 and 3; default 1)")
    parser.add_argument("--flavor", default="coca_tiny", help="model flavor (default coca_tiny: 64px, patch 8)")
    parser.add_argument("--model-set", nargs="*", default=list(DEFAULT_MODEL_SET), metavar="KEY=VALUE",
                        help="CoCaConfig overrides of the flavor; replaces the default "
                             f"{' '.join(DEFAULT_MODEL_SET)} (pass --model-set alone for the plain flavor)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before the ranks are killed")
    args = parser.parse_args()
    sides: list[str] = []
    for name in args.sides:
        for side in ALIASES.get(name, [name]):
            if side not in SIDES:
                parser.error(f"unknown side {name!r}; choose from {', '.join(list(SIDES) + list(ALIASES))}")
            if side not in sides:
                sides.append(side)
    args.sides = sides
    if min(args.micro_batches) < PP:
        parser.error(f"1F1B over {PP} stages needs at least {PP} micro-batches per step")
    if args.steps < 1 or args.warmup < 0 or args.micro_batch_size < 1:
        parser.error("--steps >= 1, --warmup >= 0, --micro-batch-size >= 1")
    model_config(args)  # bad overrides fail here, before any process starts
    load_before = [round(x, 2) for x in os.getloadavg()]
    began = time.perf_counter()
    ranks = run_two_ranks(args)
    report(args, ranks, load_before, time.perf_counter() - began)



def _silent_logger():
    """The Trainer's logger, switched off (a benchmark prints its own report)."""
    from megacoca.metrics.logger import MetricsLogger

    return MetricsLogger("", enabled=False)


if __name__ == "__main__":
    main()

