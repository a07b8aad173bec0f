"""CoCa against its single-objective ablations on the synth-shapes demo data (issue 12; the paper's Table 8b).

Three objectives: `coca` (contrastive weight 1, caption weight 2), `contrastive_only` (caption weight 0: no
multimodal decoder or caption head runs) and `captioning_only` (contrastive weight 0: no contrastive pooler or
projection runs). Each trains coca_tiny as benchmarks/learning_ablations.py does (the demo's data, 64 px, patch 8,
context 12, one rank, ZeRO-0 fp32, one thread, `--parallel` runs at a time), over `--seeds`, at two budgets:

- equal steps: every objective trains `--steps` steps of `--batch` samples (cosine schedule by default);
- equal wall time: every objective trains for CoCa's `--steps` x its step time, i.e. `--steps` x (CoCa's step
  time / its own) steps, with its own schedule over them. The step times come first, from `--cost-steps`
  steps of each objective run alone on the otherwise idle machine (the median samples/s of the log records
  after the first 20 steps). A budget within 3% of `--steps` reuses the equal-step runs.

Every run saves its final weights; the script then evaluates each on the whole held-out split (megacoca.eval:
zero-shot top-1 by embeddings and by caption likelihood, exact and same-class retrieval R@1, caption match)
and prints, per budget and objective, the mean over seeds with the spread (min-max), the measured cost ratio
and the FLOP ratio (megacoca.metrics.flops). Not a test; it took 100 minutes on 2 cores (shared with other
runs for an hour of it). Figures: docs/benchmarks.md.

    make demo-data   # or: bash scripts/demo.sh once (it writes data/shapes)
    .venv/bin/python benchmarks/objective_ablations.py --json runs/objectives/results.json
    .venv/bin/python benchmarks/objective_ablations.py --report runs/objectives/results.json   # the tables again
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from learning_ablations import add_run_arguments, check_data, command, run_all  # noqa: E402

OBJECTIVES = ("coca", "contrastive_only", "captioning_only")
METRICS = (("zeroshot_top1", "zero-shot (embeddings)"), ("zeroshot_shape_acc", "  shape right"),
           ("zeroshot_generative_top1", "zero-shot (caption likelihood)"), ("i2t_r1", "image->text R@1"),
           ("class_i2t_r1", "same-class image->text R@1"), ("class_t2i_r1", "same-class text->image R@1"),
           ("caption_match", "caption match"))


def _samples_per_s(run_dir: str, skip: int = 20) -> float:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rates = [r["samples_per_s"] for r in map(json.loads, f) if r.get("samples_per_s") and r["step"] > skip]
    if not rates:
        raise RuntimeError(f"{run_dir}: no throughput records after step {skip}")
    return statistics.median(rates)


def measure_costs(args) -> dict:
    """{objective: seconds per step}, each objective run alone."""
    costs = {}
    for objective in OBJECTIVES:
        run_args = copy.copy(args)
        run_args.steps, run_args.eval_every = args.cost_steps, 0
        run_args.set = [*args.set, "logging.log_every=5", "checkpoint.save_final=false"]
        run_dir = os.path.join(args.out, "cost", objective)
        if not run_all({objective: (command(objective, 0, run_args, run_dir), run_dir)}, parallel=1):
            raise RuntimeError(f"the cost run of {objective} failed: see {run_dir}/train.log")
        costs[objective] = args.batch / _samples_per_s(run_dir)
        print(f"{objective}: {costs[objective] * 1e3:.0f} ms per step of {args.batch}", flush=True)
    return costs


def flop_ratios(args) -> dict:
    """Training FLOPs per sample of each objective over contrastive-only's, for the runs' model."""
    from megacoca.config.recipes import build_config
    from megacoca.metrics.flops import train_flops_per_sample

    overrides = [s for s in command("coca", 0, args, "/tmp/unused") if "model.overrides." in s]
    cfg = build_config("coca_tiny_cpu", overrides=overrides).model_config()
    flops = {"coca": train_flops_per_sample(cfg), "contrastive_only": train_flops_per_sample(cfg, captioning=False),
             "captioning_only": train_flops_per_sample(cfg, contrastive=False)}
    return {o: flops[o] / flops["contrastive_only"] for o in OBJECTIVES}


def evaluate_run(run_dir: str, data: str) -> dict:
    from megacoca.data.tokenizer import load_tokenizer
    from megacoca.eval.runner import evaluate, load_eval_set, load_model_for_eval

    model = load_model_for_eval(os.path.join(run_dir, "checkpoints"))
    tokenizer = load_tokenizer(os.path.join(data, "tokenizer.model"), model.cfg.context_length)
    eval_set = load_eval_set(os.path.join(data, "val"), model.cfg.image_size)
    results = evaluate(model, tokenizer, eval_set, batch_size=240, num_examples=0, generative_zeroshot=True)
    return {key: results[key] for key, _ in METRICS}


def report(data: dict) -> str:
    costs, flops, budgets = data["costs"], data["flop_ratios"], data["budgets"]
    lines = [f"Step time, one rank, {data['args']['batch']} samples per step, each objective alone:", "",
             "| objective | ms per step | measured cost / contrastive-only | FLOPs / contrastive-only |",
             "|---|---|---|---|"]
    for objective in OBJECTIVES:
        lines.append(f"| {objective} | {costs[objective] * 1e3:.0f} | "
                     f"{costs[objective] / costs['contrastive_only']:.3f} | {flops[objective]:.3f} |")
    for budget in ("equal_steps", "equal_time"):
        lines += ["", f"{budget.replace('_', ' ')} (mean over seeds {data['args']['seeds']}, min-max):", "",
                  "| metric | " + " | ".join(f"{o} ({budgets[budget][o]} steps)" for o in OBJECTIVES) + " |",
                  "|---|" + "---|" * len(OBJECTIVES)]
        for key, label in METRICS:
            cells = []
            for objective in OBJECTIVES:
                values = [run["eval"][key] for run in data["runs"]
                          if run["objective"] == objective and run["steps"] == budgets[budget][objective]
                          and run["eval"].get(key) is not None]
                cells.append(f"{statistics.fmean(values):.3f} ({min(values):.2f}-{max(values):.2f})" if values
                             else "-")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, steps=600, decay="cosine", eval_every=200, out="objectives",
                      steps_help="CoCa's steps (the equal-step budget)",
                      eval_help="the runs' periodic eval (their curves)")
    parser.add_argument("--cost-steps", type=int, default=80)
    parser.add_argument("--json", metavar="PATH", help="write costs, budgets and every run's evaluation")
    parser.add_argument("--report", metavar="PATH", help="print the tables of an earlier --json and exit")
    args = parser.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            print(report(json.load(f)))
        return 0
    check_data(parser, args)

    costs = measure_costs(args)
    budgets = {"equal_steps": {o: args.steps for o in OBJECTIVES}, "equal_time": {}}
    for objective in OBJECTIVES:
        steps = round(args.steps * costs["coca"] / costs[objective])
        budgets["equal_time"][objective] = args.steps if abs(steps - args.steps) < 0.03 * args.steps else steps
    print(f"budgets: {budgets}", flush=True)

    runs = {}
    for seed in args.seeds:
        for objective in OBJECTIVES:
            for steps in sorted({b[objective] for b in budgets.values()}):
                run_args = copy.copy(args)
                run_args.steps = steps
                run_args.set = [*args.set, "checkpoint.save_final=true"]
                run_dir = os.path.join(args.out, f"{objective}_{steps}_s{seed}")
                runs[(objective, steps, seed)] = (command(objective, seed, run_args, run_dir), run_dir)
    trained = run_all(runs, args.parallel)
    results = []
    for (objective, steps, seed), (_, run_dir) in runs.items():
        if (objective, steps, seed) not in trained:
            continue
        evaluation = evaluate_run(run_dir, args.data)
        results.append({"objective": objective, "steps": steps, "seed": seed, "eval": evaluation,
                        "curve": trained[(objective, steps, seed)]["curve"],
                        "wall_s": trained[(objective, steps, seed)]["wall_s"]})
        print(f"{objective} {steps} steps seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in evaluation.items()),
              flush=True)
    data = {"args": vars(args), "costs": costs, "flop_ratios": flop_ratios(args), "budgets": budgets,
            "runs": results}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    print(report(data))
    return 0 if len(results) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
