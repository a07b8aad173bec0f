"""Learning curves of coca_tiny on the synth-shapes demo data under model / loss variants, over seeds (issue 12).

Each run trains the `coca_tiny_cpu` recipe with the demo's data settings (64 px, patch 8, context 12, the demo's
SentencePiece tokenizer) on ONE rank (ZeRO-0 fp32, one thread) through the deepspeed launcher, `--parallel` runs
at a time, evaluates on the held-out split every `--eval-every` steps (the trainer's periodic eval: zero-shot
top-1 with colour and shape scored separately, retrieval, caption match), and the script prints one table per
metric: variant x step, the mean over seeds with the spread (min-max), plus each run's wall time. Not a test.

    make demo-data   # or: bash scripts/demo.sh once (it writes data/shapes)
    .venv/bin/python benchmarks/learning_ablations.py --variants paper open_clip --seeds 0 1 2 --json /tmp/a.json
    .venv/bin/python benchmarks/learning_ablations.py --variants paper paper_parallel --steps 600 --seeds 0 1

The variants (VARIANTS below) are `--set` overrides on top of the common settings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODEL = "model.overrides."
VARIANTS: dict[str, list[str]] = {
    # the two pooler layouts (megacoca.models.coca.poolers)
    "paper": [MODEL + "pooler_layout=paper"],
    "open_clip": [MODEL + "pooler_layout=open_clip"],
    # the paper layout's ablations
    "paper_parallel": [MODEL + "pooler_layout=paper", MODEL + "pooler_cascade=false"],
    "paper_q8": [MODEL + "pooler_layout=paper", MODEL + "caption_queries=8"],
    "paper_q1": [MODEL + "pooler_layout=paper", MODEL + "caption_queries=1"],
    "paper_query_std1": [MODEL + "pooler_layout=paper", MODEL + "pooler_query_std=1.0"],
    "open_clip_query_std1": [MODEL + "pooler_layout=open_clip", MODEL + "pooler_query_std=1.0"],
    "paper_lr2x": [MODEL + "pooler_layout=paper", "optim.lr=2e-3"],
    # the losses (issue 12 section 3; benchmarks/objective_ablations.py): CoCa (the project's defaults),
    # contrastive-only and captioning-only
    "coca": [],
    "contrastive_only": ["optim.caption_weight=0"],
    "captioning_only": ["optim.contrastive_weight=0"],
    # contrastive negatives (issue 23): the whole batch as 8 micro-batches of 16, each gathered alone ("micro":
    # 15 negatives per image) or the whole batch exactly ("global": 127, as `coca`'s one micro-batch of 128)
    "micro_accum8": ["schedule.micro_batch_size=16"],
    "global_accum8": ["schedule.micro_batch_size=16", "loss.negatives=global"],
}
METRICS = ("zeroshot_shape_acc", "zeroshot_top1", "caption_match", "i2t_r1")
# run_all puts a port that is free when the run starts here (one taken when the sweep started can be in use by then)
PORT_AT_LAUNCH = "<free port at launch>"
WALL_FILE = "wall_s.json"  # a finished run's wall time, beside its metrics (what --reuse reads)


def command(variant: str, seed: int, args, run_dir: str) -> list[str]:
    data = args.data
    sets = [f"data.tokenizer={data}/tokenizer.model", f"schedule.steps={args.steps}",
            f"schedule.global_batch_size={args.batch}", f"schedule.micro_batch_size={args.batch}",
            f"schedule.warmup_steps={args.warmup}", f"optim.lr={args.lr}", f"schedule.decay={args.decay}",
            f"eval.every={args.eval_every}", "checkpoint.every=0", "checkpoint.save_final=false",
            "logging.tensorboard=false", f"seed={seed}", MODEL + "context_length=12", MODEL + "image_size=64",
            MODEL + "patch_size=8", *VARIANTS[variant], *args.set]
    return ["deepspeed", "--num_gpus", "1", "--master_port", PORT_AT_LAUNCH, "--module", "megacoca.train",
            "--recipe", "coca_tiny_cpu", "--train-shards", f"{data}/train", "--val-shards", f"{data}/val",
            "--run-dir", run_dir, "--deepspeed-config", "zero0_fp32",
            *(word for s in sets for word in ("--set", s))]


def curve(run_dir: str) -> dict[int, dict]:
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "eval/zeroshot_top1" in record:
                out[record["step"]] = {m: record[f"eval/{m}"] for m in METRICS}
    return out


def finished(run_dir: str, steps: int) -> dict | None:
    """{"curve", "wall_s"} of a run that finished in `run_dir` (its wall time recorded, its curve reaching `steps`),
    else None."""
    wall = os.path.join(run_dir, WALL_FILE)
    if not os.path.exists(wall):
        return None
    with open(wall) as handle:
        result = {"curve": curve(run_dir), "wall_s": json.load(handle)}
    return result if result["curve"] and max(result["curve"]) == steps else None


def run_all(runs: dict, parallel: int) -> dict:
    """Run {name: (command, run_dir)} `parallel` at a time, one thread each; {name: {"curve", "wall_s"}} of the
    runs that finished (a failed one is reported and left out)."""
    from megacoca.launch.process_group import free_port  # a free port for each rendezvous, taken at its start

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    queue = list(runs.items())
    running, results = [], {}
    while queue or running:
        while queue and len(running) < parallel:
            name, (argv, run_dir) = queue.pop(0)
            os.makedirs(run_dir, exist_ok=True)
            log = open(os.path.join(run_dir, "train.log"), "w")
            argv = [str(free_port()) if word == PORT_AT_LAUNCH else word for word in argv]
            proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            running.append((name, run_dir, proc, log, time.perf_counter()))
        time.sleep(2)
        for item in list(running):
            name, run_dir, proc, log, began = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            if proc.returncode:
                print(f"{name}: FAILED (exit {proc.returncode}), see {run_dir}/train.log", flush=True)
                continue
            results[name] = {"curve": curve(run_dir), "wall_s": round(time.perf_counter() - began, 1)}
            with open(os.path.join(run_dir, WALL_FILE), "w") as handle:
                json.dump(results[name]["wall_s"], handle)
            print(f"{name}: done in {results[name]['wall_s']:.0f} s", flush=True)
    return results


def add_run_arguments(parser: argparse.ArgumentParser, *, steps: int, decay: str, eval_every: int, out: str,
                      steps_help: str | None = None, eval_help: str | None = None) -> None:
    """The arguments `command` reads (and `check_data` checks), with this script's or another's defaults."""
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=steps, help=steps_help)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--decay", default=decay)
    parser.add_argument("--eval-every", type=int, default=eval_every, help=eval_help)
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--data", default=os.path.join(REPO, "data", "shapes"))
    parser.add_argument("--out", default=os.path.join(REPO, "runs", out))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for every run")


def check_data(parser: argparse.ArgumentParser, args) -> None:
    if not os.path.exists(os.path.join(args.data, "tokenizer.model")):
        parser.error(f"{args.data}: no demo data (run `bash scripts/demo.sh` once, or `make demo`)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["paper", "open_clip"], choices=list(VARIANTS))
    add_run_arguments(parser, steps=400, decay="constant", eval_every=100, out="ablations")
    parser.add_argument("--json", metavar="PATH", help="also write every run's curve and wall time")
    parser.add_argument("--reuse", action="store_true",
                        help="take runs that finished in --out before (their curve at --steps and wall time) as they "
                             "are: a sweep that was interrupted continues")
    args = parser.parse_args(argv)
    check_data(parser, args)

    runs = {(v, s): (command(v, s, args, os.path.join(args.out, f"{v}_s{s}")), os.path.join(args.out, f"{v}_s{s}"))
            for s in args.seeds for v in args.variants}
    reused = {name: finished(run_dir, args.steps) for name, (_, run_dir) in runs.items()} if args.reuse else {}
    reused = {name: result for name, result in reused.items() if result}
    for name in reused:
        print(f"{name}: finished before, in {runs[name][1]} (--reuse)", flush=True)
    results = {**reused, **run_all({k: v for k, v in runs.items() if k not in reused}, args.parallel)}
    for (variant, seed), result in results.items():
        last = result["curve"][max(result["curve"])]
        print(f"{variant} seed {seed}: {result['wall_s']:.0f} s, final " +
              ", ".join(f"{m} {last[m]:.3f}" for m in METRICS), flush=True)

    steps = sorted({step for r in results.values() for step in r["curve"]})
    for metric in METRICS:
        print(f"\n{metric}: mean over seeds {args.seeds} (min-max)\n")
        print("| variant | " + " | ".join(f"step {s}" for s in steps) + " | wall s |")
        print("|---|" + "---|" * (len(steps) + 1))
        for variant in args.variants:
            runs = [results[(variant, s)] for s in args.seeds if (variant, s) in results]
            cells = []
            for step in steps:
                values = [r["curve"][step][metric] for r in runs if step in r["curve"]]
                cells.append(f"{statistics.fmean(values):.3f} ({min(values):.2f}-{max(values):.2f})" if values
                             else "-")
            wall = statistics.fmean(r["wall_s"] for r in runs) if runs else 0
            print(f"| {variant} | " + " | ".join(cells) + f" | {wall:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": [{"variant": v, "seed": s, **r} for (v, s), r in results.items()]},
                      f, indent=1)
    return 0 if len(results) == len(args.variants) * len(args.seeds) else 1


if __name__ == "__main__":
    sys.exit(main())
