"""Rank-0 metrics: a console progress line, TensorBoard events and `metrics.jsonl` in the run directory.

Every record is one JSON object per line; training records carry at least
step, loss, loss_contrastive, loss_caption, logit_scale, lr, grad_norm, samples_per_s, tflops_per_device,
mfu (null when the device's peak is unknown) and skipped_samples, and `straggler` when one rank held the others
up (megacoca.metrics.stragglers), and with a data mixture `data/<source>/samples|epochs|skipped`
(megacoca.metrics.records.source_record; the progress line shows each source's share and epochs compactly).
Eval records carry step and `eval/...`.
Other ranks get a logger whose methods do nothing, so callers never branch on rank.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

TRAIN_KEYS = ("step", "loss", "loss_contrastive", "loss_caption", "logit_scale", "lr", "grad_norm",
              "samples_per_s", "tflops_per_device", "mfu", "skipped_samples")


def _clean(value):
    """JSON-safe: tensors to numbers, nan/inf to null."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    def __init__(self, run_dir: str, *, enabled: bool = True, tensorboard: bool = True, total_steps: int = 0,
                 stream=None):
        self.enabled = enabled
        self.run_dir = run_dir
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self.writer = None
        self.jsonl = None
        self.tensorboard = tensorboard
        self._start_time = None
        self._start_step = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.jsonl = open(self.path, "a", buffering=1)
        self._open_writer()

    def _open_writer(self, purge_step: int | None = None) -> None:
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # heavy (~1 s): only with logging.tensorboard

            self.writer = SummaryWriter(log_dir=os.path.join(self.run_dir, "tensorboard"), purge_step=purge_step)

    def resume_at(self, step: int) -> None:
        """A run resumed from `step`: drop the records after it (an abandoned timeline) from metrics.jsonl and
        TensorBoard, so the logs read like one uninterrupted run."""
        if not self.enabled:
            return
        self.jsonl.close()
        with open(self.path) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)
        self.jsonl = open(self.path, "a", buffering=1)
        if self.writer is not None:
            self.writer.close()
            self._open_writer(purge_step=step + 1)

    def _write(self, record: dict) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key if "/" in key else f"train/{key}", value, record["step"])

    def log_train(self, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {key: _clean(metrics.get(key)) for key in TRAIN_KEYS}
        record.update({k: _clean(v) for k, v in metrics.items() if k not in record})
        self._write(record)
        self.stream.write(self.progress_line(record) + "\n")
        self.stream.flush()

    def log_eval(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step}
        record.update({(k if k.startswith("eval/") else f"eval/{k}"): _clean(v) for k, v in metrics.items()})
        self._write(record)
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                         if k != "step")
        self.stream.write(f"eval step {step}: {shown}\n")
        self.stream.flush()

    def info(self, message: str) -> None:
        if self.enabled:
            self.stream.write(message + "\n")
            self.stream.flush()

    def progress_line(self, record: dict) -> str:
        step = record["step"]
        now = time.perf_counter()
        if self._start_time is None:
            self._start_time, self._start_step = now, step
            eta = "?"
        else:
            done = step - self._start_step
            remaining = max(self.total_steps - step, 0)
            eta = _duration((now - self._start_time) / max(done, 1) * remaining) if done else "?"

        def fmt(key: str, spec: str = ".4f") -> str:
            value = record.get(key)
            return "-" if value is None else format(value, spec)

        width = len(str(self.total_steps)) if self.total_steps else 1
        line = (f"step {step:>{width}}/{self.total_steps} | loss {fmt('loss')} "
                f"(con {fmt('loss_contrastive')} cap {fmt('loss_caption')}) | scale {fmt('logit_scale', '.2f')} "
                f"| lr {fmt('lr', '.2e')} | gnorm {fmt('grad_norm', '.3f')} "
                f"| {fmt('samples_per_s', '.1f')} samples/s | {fmt('tflops_per_device', '.3g')} TFLOP/s/dev")
        if record.get("mfu") is not None:
            line += f" | MFU {100 * record['mfu']:.1f}%"
        if record.get("skipped_samples"):
            line += f" | skipped {record['skipped_samples']}"
        mixture = _mixture_summary(record)
        if mixture:
            line += f" | {mixture}"
        if record.get("skipped_step"):
            line += f" | SKIPPED: {record.get('skip_reason')}"
        if record.get("straggler"):
            slow = record["straggler"]
            line += f" | straggler rank {slow['rank']} ({slow['step_s']:.3g} s/step, median {slow['median_s']:.3g})"
        if record.get("pipeline_idle"):
            line += " | stage idle " + "/".join(f"{100 * idle:.0f}%" for idle in record["pipeline_idle"])
        return line + f" | ETA {eta}"

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None


def _mixture_summary(record: dict) -> str:
    """`a 50% e2, b 30% e0`: each mixture source's share of the samples taken so far and its completed epochs."""
    samples = {key[len("data/"):-len("/samples")]: value for key, value in record.items()
               if key.startswith("data/") and key.endswith("/samples")}
    total = sum(samples.values())
    if not total:
        return ""
    return ", ".join(f"{name} {100 * count / total:.0f}% e{record.get(f'data/{name}/epochs', 0)}"
                     for name, count in samples.items())


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
