"""The demo data as two sources: does a captions + labels mixture train to the demo's zero-shot (issue 27)?

Two arms, each the demo exactly as scripts/demo.sh runs it (the `coca_tiny_shapes` recipe with no training
overrides: 1200 steps of 128 on 2 ranks through the deepspeed launcher, ZeRO-3 fp32, one thread per rank), then
`megacoca eval` on the held-out split data/shapes/val as the demo evaluates it:

- `captions`: the demo as it is, `--train-shards data/shapes/train` (20k captioned single-object images);
- `mixture`: the same, with `data.sources` (a `--config` file, no `--train-shards`): the captions source
  data/shapes/train and a label source data/shapes_labels/train (20k other single-object images, each a `.cls`
  class id rendered through a caption template drawn per sample), weight 0.5 each.

Runs go one at a time (`--parallel 1`: the two ranks take both cores), each training's log in RUN/train.log and its
wall time in RUN/wall_s.json (benchmarks/learning_ablations.py's `run_all`); `--reuse` takes runs that finished
before (trained and evaluated) as they are. Prints, per arm and seed, the held-out figures and the per-source
samples of the mixture, then each arm's mean and spread (min-max) over the seeds. Not a test. Figures:
docs/benchmarks.md, "Data mixtures".

    bash scripts/demo.sh   # once, for data/shapes (its data step is stamped and reused)
    .venv/bin/python benchmarks/mixture_learning.py --seeds 0 1 --json runs/mixture_learning/results.json

The label source is written here when it is missing (`megacoca data synth-shapes --out data/shapes_labels
--labels-only --train-samples 20000 --val-samples 0`, a few seconds).
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from learning_ablations import PORT_AT_LAUNCH, WALL_FILE, check_data, curve, run_all  # noqa: E402

ARMS = ("captions", "mixture")
DEMO_STAMP = "20000 1200 64 0.0 128 0"  # scripts/demo.sh's data stamp at its defaults
EVAL_FILE = "eval.json"
FIGURES = ("zeroshot_top1", "zeroshot_shape_acc", "caption_match", "i2t_r1", "t2i_r1")


def mixture_config(args) -> dict:
    """The mixture arm's `--config`: data.sources instead of the recipe's data.train_shards."""
    labels = args.labels
    return {"data": {"train_shards": "", "sources": [
        {"name": "captions", "shards": f"{args.data}/train", "weight": 1 - args.label_weight, "text": "caption"},
        {"name": "labels", "shards": f"{labels}/train", "weight": args.label_weight, "text": "labels",
         "label_field": "cls", "class_names": f"{labels}/classnames.txt", "templates": f"{labels}/templates.txt"},
    ]}}


def command(arm: str, seed: int, args, run_dir: str) -> list[str]:
    """scripts/demo.sh's training command (2 ranks, the recipe, the demo's tokenizer), for one arm and seed."""
    data = ["--train-shards", f"{args.data}/train"] if arm == "captions" else ["--config", args.config_path]
    sets = [f"data.tokenizer={args.data}/tokenizer.model", f"seed={seed}", *args.set]
    return ["deepspeed", "--num_gpus", str(args.nproc), "--master_port", PORT_AT_LAUNCH, "--module", "megacoca.train",
            "--recipe", "coca_tiny_shapes", *data, "--val-shards", f"{args.data}/val", "--run-dir", run_dir,
            *(word for s in sets for word in ("--set", s))]


def evaluate(run_dir: str, args) -> dict:
    """`megacoca eval` of the run's final checkpoint on the held-out split, as scripts/demo.sh runs it."""
    out = os.path.join(run_dir, EVAL_FILE)
    env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count() or 1))
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "megacoca", "eval", "--checkpoint", os.path.join(run_dir, "checkpoints"),
                    "--shards", f"{args.data}/val", "--tokenizer", f"{args.data}/tokenizer.model", "--out", out],
                   cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(out) as handle:
        results = json.load(handle)
    results["eval_wall_s"] = round(time.perf_counter() - began, 1)
    with open(out, "w") as handle:
        json.dump(results, handle, indent=1)
    return results


def source_samples(run_dir: str) -> dict[str, int]:
    """The samples each source gave over the run (summed over the ranks), from the last metrics record that has
    them; {} for a one-source run."""
    last = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        for line in handle:
            record = json.loads(line)
            found = {key.split("/")[1]: value for key, value in record.items()
                     if key.startswith("data/") and key.endswith("/samples")}
            last = found or last
    return last


def ensure_labels(args) -> None:
    """Write the label-only source if it is not there."""
    if os.path.isfile(os.path.join(args.labels, "templates.txt")):
        with open(os.path.join(args.labels, "meta.json")) as handle:
            meta = json.load(handle)
        if meta.get("train_samples") != args.label_samples:
            raise SystemExit(f"{args.labels} holds {meta.get('train_samples')} label samples, not "
                             f"{args.label_samples}: remove it or give --labels another directory")
        return
    subprocess.run([sys.executable, "-m", "megacoca", "data", "synth-shapes", "--out", args.labels, "--labels-only",
                    "--train-samples", str(args.label_samples), "--val-samples", "0"], cwd=REPO, check=True)


def spread(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} ({min(values):.3f}-{max(values):.3f})" if values else "-"


def report(results: dict, arms: list[str], seeds: list[int]) -> str:
    lines = ["| arm | seed | zero-shot top-1 | shape right | caption match | R@1 i->t / t->i | zero-shot at "
             "each periodic eval | samples per source | train s | eval s |", "|---|" + "---|" * 9]
    for arm in arms:
        for seed in seeds:
            r = results.get((arm, seed))
            if r is None:
                lines.append(f"| {arm} | {seed} | not run or failed |" + " |" * 7)
                continue
            e, periodic = r["eval"], r["curve"]
            steps = " / ".join(f"{periodic[s]['zeroshot_top1']:.3f}" for s in sorted(periodic))
            per_source = ", ".join(f"{name} {count}" for name, count in r["sources"].items()) or "-"
            lines.append(f"| {arm} | {seed} | {e['zeroshot_top1']:.3f} | {e['zeroshot_shape_acc']:.3f} | "
                         f"{e['caption_match']:.3f} | {e['i2t_r1']:.3f} / {e['t2i_r1']:.3f} | {steps} | {per_source} "
                         f"| {r['wall_s']:.0f} | {e['eval_wall_s']:.0f} |")
    lines += ["", "| arm | seeds | " + " | ".join(FIGURES) + " |", "|---|---|" + "---|" * len(FIGURES)]
    for arm in arms:
        done = [results[(arm, s)]["eval"] for s in seeds if (arm, s) in results]
        lines.append(f"| {arm} | {len(done)} | " + " | ".join(spread([e[f] for e in done]) for f in FIGURES) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--data", default=os.path.join(REPO, "data", "shapes"))
    parser.add_argument("--labels", default=os.path.join(REPO, "data", "shapes_labels"))
    parser.add_argument("--label-samples", type=int, default=20000)
    parser.add_argument("--label-weight", type=float, default=0.5, help="the captions source has 1 minus this")
    parser.add_argument("--nproc", type=int, default=2, help="ranks per run (scripts/demo.sh's NPROC)")
    parser.add_argument("--out", default=os.path.join(REPO, "runs", "mixture_learning"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for every run")
    parser.add_argument("--reuse", action="store_true", help="take runs trained and evaluated in --out before")
    parser.add_argument("--json", metavar="PATH", help="also write every run's figures")
    args = parser.parse_args(argv)
    check_data(parser, args)
    stamp = os.path.join(args.data, ".demo-stamp")
    if not os.path.isfile(stamp) or open(stamp).read().strip() != DEMO_STAMP:
        parser.error(f"{args.data} is not the demo's data at its defaults (stamp {DEMO_STAMP!r}): run "
                     "`bash scripts/demo.sh` with no data overrides")
    if "mixture" in args.arms:
        ensure_labels(args)
    os.makedirs(args.out, exist_ok=True)
    args.config_path = os.path.join(args.out, "mixture.yaml")
    with open(args.config_path, "w") as handle:  # JSON is YAML
        json.dump(mixture_config(args), handle, indent=1)

    results = {}
    for seed in args.seeds:
        for arm in args.arms:
            run_dir = os.path.join(args.out, f"{arm}_s{seed}")
            wall, evaluated = os.path.join(run_dir, WALL_FILE), os.path.join(run_dir, EVAL_FILE)
            if args.reuse and os.path.exists(wall) and os.path.exists(evaluated):
                print(f"{arm} seed {seed}: finished before, in {run_dir} (--reuse)", flush=True)
                with open(wall) as handle, open(evaluated) as handle2:
                    results[(arm, seed)] = {"wall_s": json.load(handle), "eval": json.load(handle2)}
            else:
                print(f"{arm} seed {seed}: " + " ".join(command(arm, seed, args, run_dir)), flush=True)
                trained = run_all({(arm, seed): (command(arm, seed, args, run_dir), run_dir)}, parallel=1)
                if (arm, seed) not in trained:
                    continue
                results[(arm, seed)] = {"wall_s": trained[(arm, seed)]["wall_s"], "eval": evaluate(run_dir, args)}
            results[(arm, seed)].update(curve=curve(run_dir), sources=source_samples(run_dir))
            e = results[(arm, seed)]["eval"]
            print(f"{arm} seed {seed}: zero-shot {e['zeroshot_top1']:.3f}, caption match {e['caption_match']:.3f}",
                  flush=True)
    print("\n" + report(results, args.arms, args.seeds))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": {k: v for k, v in vars(args).items()},
                       "runs": [{"arm": a, "seed": s, **r} for (a, s), r in results.items()]}, handle, indent=1)
    return 0 if len(results) == len(args.arms) * len(args.seeds) else 1


if __name__ == "__main__":
    sys.exit(main())
