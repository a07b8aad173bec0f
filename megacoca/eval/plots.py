"""Training curves from a run's metrics.jsonl: losses (and logit scale) by step, and eval metrics if logged."""

from __future__ import annotations

import json
import math
import os

LOSS_KEYS = ("loss", "loss_contrastive", "loss_caption")
EVAL_KEYS = ("eval/zeroshot_top1", "eval/i2t_r1", "eval/t2i_r1", "eval/caption_match")


def read_metrics(path: str) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a metrics.jsonl; unreadable lines are skipped."""
    train, evals = [], []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict) or "step" not in record:
                continue
            (evals if any(k.startswith("eval/") for k in record) else train).append(record)
    return train, evals


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in records
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def plot_curves(metrics_path: str, out_path: str, final_eval: dict | None = None, title: str | None = None) -> str:
    """Draw loss curves (left) and eval metrics (right) to `out_path` (PNG). `final_eval` (the eval.json of
    the finished run) adds its numbers at the last training step when the trainer logged no evals."""
    import matplotlib  # heavy (~1 s), and the backend must be chosen before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = read_metrics(metrics_path)
    if final_eval:
        last = max([r["step"] for r in train + evals], default=0)
        evals = evals + [{"step": last, **{f"eval/{k}": final_eval.get(k) for k in
                                           ("zeroshot_top1", "i2t_r1", "t2i_r1", "caption_match")}}]
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    for key in LOSS_KEYS:
        steps, values = _series(train, key)
        if steps:
            ax_loss.plot(steps, values, label=key, linewidth=1.2 if key == "loss" else 0.9)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    ax_loss.set_title("training loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    plotted = False
    for key in EVAL_KEYS:
        steps, values = _series(evals, key)
        if steps:
            ax_eval.plot(steps, values, marker="o", label=key.removeprefix("eval/"))
            plotted = True
    ax_eval.axhline(1 / 24, color="gray", linestyle=":", linewidth=1, label="chance (1/24)")
    ax_eval.set_ylim(0, 1.02)
    ax_eval.set_xlabel("step")
    ax_eval.set_title("held-out eval" if plotted else "held-out eval (none logged)")
    ax_eval.grid(alpha=0.3)
    ax_eval.legend(loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
