"""The demo's curves over several runs (seeds) in one picture: what README.md and docs/benchmarks.md show.

    python scripts/demo_curves.py runs/demo_s0 runs/demo_s1 runs/demo_s2    # -> docs/images/demo_curves.png

Left: each run's training loss against steps. Right: its periodic held-out eval (the trainer's hook, every
`eval.every` steps) against steps, zero-shot top-1 solid and caption match dashed; a star at the last step is the
final evaluation of the whole held-out split (RUN/eval.json, written by scripts/demo.sh). Each run keeps its
colour in both panels; it is labelled `--labels`, else its directory name. Reads only the runs' own files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megacoca.eval.plots import read_metrics  # noqa: E402

DEFAULT_OUT = "docs/images/demo_curves.png"
CHANCE = 1 / 24  # 24 classes: 6 colours x 4 shapes


def _points(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def draw(run_dirs: list[str], out_path: str, labels: list[str] | None = None, title: str | None = None) -> str:
    """Draw the runs' loss and eval curves into `out_path` (PNG) and return it."""
    import matplotlib  # heavy, and the backend must be chosen before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise SystemExit(f"{len(labels)} labels for {len(run_dirs)} runs")
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    for index, (run_dir, label) in enumerate(zip(run_dirs, labels)):
        colour = f"C{index}"
        train, evals = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
        if not train:
            raise SystemExit(f"{run_dir}/metrics.jsonl has no training records")
        ax_loss.plot(*_points(train, "loss"), color=colour, linewidth=1.0, label=label)
        ax_eval.plot(*_points(evals, "eval/zeroshot_top1"), color=colour, marker="o", label=f"{label} zero-shot")
        ax_eval.plot(*_points(evals, "eval/caption_match"), color=colour, marker="s", linestyle="--",
                     label=f"{label} caption match")
        final_path = os.path.join(run_dir, "eval.json")
        if os.path.isfile(final_path):
            with open(final_path) as handle:
                final = json.load(handle)
            last = train[-1]["step"]
            ax_eval.scatter([last, last], [final["zeroshot_top1"], final["caption_match"]], color=colour, marker="*",
                            s=90, zorder=3)
    ax_loss.set(xlabel="step", ylabel="training loss", yscale="log", title="loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_eval.axhline(CHANCE, color="gray", linestyle=":", linewidth=1, label="chance (1/24)")
    ax_eval.set(xlabel="step", xlim=ax_loss.get_xlim(), ylim=(0, 1.02),
                title="held-out eval (stars: final, whole split)")
    ax_eval.grid(alpha=0.3)
    ax_eval.legend(loc="lower right", fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="demo run directories (each with its metrics.jsonl)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"PNG to write (default {DEFAULT_OUT})")
    parser.add_argument("--labels", nargs="+", default=None, help="one label per run (default: directory names)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    print(f"wrote {draw(args.run_dirs, args.out, args.labels, args.title)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
