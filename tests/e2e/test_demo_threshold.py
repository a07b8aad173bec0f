"""The demo's learning threshold, fast: scripts/demo.sh end to end (synth-shapes, tokenizer, 2-rank ZeRO-3
training with every parameter partitioned, through the deepspeed launcher, held-out eval, curves) on a shorter
schedule. Color alone is easy (learned in ~100 steps, where zero-shot top-1 is ~0.25-0.3 with shape at chance), so
the bar is per attribute: shape must be learned, not just color. The full demo (`make demo`) asks for 0.50 / 0.60
on the combined metrics."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The short schedule: larger batches at a constant lr after warmup, 400 steps (51k samples, ~4 min on 2 quiet cores
# with the data). Measured with these settings and the open_clip layout the demo used until 2026-11-30 (480 held-out
# images, zero-shot shape accuracy at step 100/200/300/400): seed 0 0.25/0.37/0.60/0.70, seed 1 0.27/0.26/0.31/0.51,
# seed 2 (500 steps) 0.27/0.40/0.64/0.78, seed 3 0.24/0.48/0.71/0.89; color 0.99-1.0 from step 100 on. With the
# coca_tiny_shapes recipe's paper layout, seed 0 (what CI runs): shape 0.588, caption shape 0.569 (2026-11-30).
# Chance is 1/4 for shape, 1/6 for color, and a color-only model scores ~0.25-0.30 on shape: the bar 0.40 was met
# by every open_clip seed tried and by paper-layout seed 0, and is missed by any run that has not learned shape
# (one-rank paper-layout runs at this schedule, docs/benchmarks.md, left seed 2 at 0.27).
SHORT = {
    "TRAIN_SAMPLES": "20000",
    "VAL_SAMPLES": "480",
    "GLOBAL_BATCH": "128",
    "LR": "1e-3",
    "LR_DECAY": "constant",
    "STEPS": "400",
    "WARMUP": "50",
    "EVAL_EVERY": "400",
    "MIN_ZEROSHOT": "0.35",
    "MIN_CAPTION": "0.35",
}
MIN_SHAPE = {"zeroshot": 0.40, "caption": 0.35}  # shape accuracy (chance 0.25; lowest seed above: 0.51 / 0.42)
MIN_COLOR = 0.90  # zero-shot and caption color accuracy (chance 0.17)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_short_demo_learns_well_above_chance(tmp_path):
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""), PYTHON=sys.executable,
               DATA_DIR=str(tmp_path / "shapes"), RUN_DIR=str(tmp_path / "run"), **SHORT)
    began = time.perf_counter()
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "demo.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - began
    output = proc.stdout[-4000:] + "\n" + proc.stderr[-4000:]
    assert proc.returncode == 0, output
    # ZeRO-3 really shards: the recipe partitions every parameter over the 2 ranks (the trainer's log line).
    assert re.search(r"ZeRO-3 partitions (\d+)/\1 tensors \(100\.0% of", proc.stdout), output
    results = json.loads((tmp_path / "run" / "eval.json").read_text())
    print(f"short demo: {seconds:.0f}s, zeroshot_top1 {results['zeroshot_top1']:.3f} (color "
          f"{results['zeroshot_color_acc']:.3f}, shape {results['zeroshot_shape_acc']:.3f}), caption_match "
          f"{results['caption_match']:.3f} (color {results['caption_color_acc']:.3f}, shape "
          f"{results['caption_shape_acc']:.3f}), wall times {results['wall_times_s']}")
    assert results["zeroshot_top1"] >= float(SHORT["MIN_ZEROSHOT"])
    assert results["caption_match"] >= float(SHORT["MIN_CAPTION"])
    for kind in ("zeroshot", "caption"):
        assert results[f"{kind}_color_acc"] >= MIN_COLOR, results
        assert results[f"{kind}_shape_acc"] >= MIN_SHAPE[kind], results  # shape learned, not only color
    assert results["num_samples"] == int(SHORT["VAL_SAMPLES"])
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    assert losses[-1] < 0.5 * losses[0]
    assert any("eval/zeroshot_top1" in r for r in records)  # the trainer's periodic eval ran
