"""Print the figures of a finished demo run (what docs/benchmarks.md quotes), from its own files only.

    python scripts/demo_report.py runs/demo          # after `make demo`; scripts/demo.sh runs it at the end

Reads RUN_DIR/metrics.jsonl (the trainer's log: losses, samples/s, periodic evals) and RUN_DIR/eval.json (the
held-out evaluation with the demo's wall times). Prints markdown tables: the held-out metrics, the loss curve at
a few steps, every periodic eval, and the training throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megacoca.eval.plots import read_metrics  # noqa: E402

EVAL_COLUMNS = ("zeroshot_top1", "zeroshot_color_acc", "zeroshot_shape_acc", "caption_match", "caption_color_acc",
                "caption_shape_acc", "i2t_r1", "t2i_r1")


def _fmt(value) -> str:
    return "n/a" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def report(run_dir: str) -> str:
    train, evals = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    if not train:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no training records")
    lines = [f"run: {os.path.abspath(run_dir)}", ""]
    path = os.path.join(run_dir, "eval.json")
    if os.path.isfile(path):
        with open(path) as handle:
            final = json.load(handle)
        lines += [f"held-out eval: {final.get('num_samples')} images ({final.get('num_zeroshot')} single-object, "
                  f"{final.get('num_captioned')} captioned)", "", "| metric | value |", "|---|---|"]
        for key in (*EVAL_COLUMNS, "zeroshot_top5", "i2t_r5", "i2t_r10", "t2i_r5", "t2i_r10", "class_i2t_r1",
                    "class_t2i_r1"):
            if key in final:
                lines.append(f"| {key} | {_fmt(final[key])} |")
        times = final.get("wall_times_s")
        if times:
            lines.append(f"| wall s: data+tokenizer / train / eval / train+eval | {times['data_and_tokenizer']:.0f} / "
                         f"{times['train']:.0f} / {times['eval']:.0f} / {times['train_plus_eval']:.0f} |")
        lines.append("")
    steps = [r["step"] for r in train]
    wanted = sorted({steps[0], *[s for s in (100, 300, 500, 900, 1500) if s in steps], steps[-1]})
    by_step = {r["step"]: r for r in train}
    lines += ["loss curve:", "", "| step | loss | contrastive | caption | lr |", "|---|---|---|---|---|"]
    for step in wanted:
        r = by_step[step]
        lines.append(f"| {step} | {r['loss']:.3f} | {r['loss_contrastive']:.3f} | {r['loss_caption']:.3f} | "
                     f"{r['lr']:.2e} |")
    if evals:
        present = [c for c in EVAL_COLUMNS if any(f"eval/{c}" in r for r in evals)]
        lines += ["", "periodic eval (the trainer's hook):", "", "| step | " + " | ".join(present) + " |",
                  "|---|" + "---|" * len(present)]
        for r in evals:
            lines.append(f"| {r['step']} | " + " | ".join(_fmt(r.get(f"eval/{c}")) for c in present) + " |")
    rates = [r["samples_per_s"] for r in train if isinstance(r.get("samples_per_s"), (int, float))]
    if rates:
        lines += ["", f"training throughput: median {statistics.median(rates):.1f} samples/s over {len(rates)} log "
                      f"windows (min {min(rates):.1f}, max {max(rates):.1f})"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", default="runs/demo")
    print(report(parser.parse_args().run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
