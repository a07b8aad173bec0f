"""The demo's learning threshold, fast: scripts/demo.sh end to end (synth-shapes, tokenizer, 2-rank ZeRO-3
training with every parameter partitioned, through the deepspeed launcher, held-out eval, curves) on a shorter
schedule (800 steps of 128 at a constant lr). Color alone is easy (learned in ~100 steps, where zero-shot top-1 is
~0.25-0.3 with shape at chance), so the bar is per attribute: shape must be learned, not just color. The full demo
(`make demo`) asks for 0.50 / 0.60 on the combined metrics."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The short schedule: larger batches at a constant lr after warmup, 800 steps (102k samples, ~6 min on 2 quiet cores
# with the data). Shape is learned only after a plateau at chance whose end is chaotic: the same seed, on another
# CPU (oneDNN's kernels round differently), leaves it hundreds of steps earlier or later. At 400 steps this test
# passed on AMD EPYC boxes (seed 0: zero-shot shape 0.588, caption shape 0.569, 2026-11-30) and failed on an Intel
# Xeon one (0.458 / 0.327, CI 2026-12-05: seed 0 was still taking off). Zero-shot / caption shape accuracy per 100
# steps on that Xeon (docs/benchmarks.md, "The demo on an Intel Xeon box"):
#   seed 0: 0.26/0.26 0.31/0.25 0.30/0.25 0.46/0.33 0.76/0.77 0.90/0.87 0.90/0.88 0.93/0.93
#   seed 1: 0.23/0.25 0.26/0.25 0.29/0.33 0.28/0.47 0.31/0.50 0.48/0.61 0.72/0.83 0.81/0.84
#   seed 2: 0.24/0.25 0.27/0.25 0.36/0.27 0.54/0.26 0.72/0.59 0.84/0.79 0.89/0.86 0.92/0.91
#   seed 3: 0.26/0.25 0.25/0.25 0.28/0.31 0.26/0.43 0.28/0.44 0.44/0.40 0.53/0.58 0.51/0.53
# so at 800 steps every seed tried has left the plateau (seed 3, the latest, near step 600) and passes; at 400 none
# does. Chance is 1/4 for shape, 1/6 for color, and a color-only model scores ~0.25-0.30 on shape: the bars below
# are missed by any run that has not learned shape. Neither a doubled lr (seed 1 at chance for 600 steps) nor 64
# per step (seed 3 at chance until step 700) leaves the plateau sooner: the longer schedule buys the margin.
SHORT = {
    "TRAIN_SAMPLES": "20000",
    "VAL_SAMPLES": "480",
    "GLOBAL_BATCH": "128",
    "LR": "1e-3",
    "LR_DECAY": "constant",
    "STEPS": "800",
    "WARMUP": "50",
    "EVAL_EVERY": "800",
    "MIN_ZEROSHOT": "0.35",
    "MIN_CAPTION": "0.35",
}
MIN_SHAPE = {"zeroshot": 0.40, "caption": 0.35}  # shape accuracy (chance 0.25; lowest seed above: 0.51 / 0.53)
MIN_COLOR = 0.90  # zero-shot and caption color accuracy (chance 0.17)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_short_demo_learns_well_above_chance(tmp_path):
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""), PYTHON=sys.executable,
               DATA_DIR=str(tmp_path / "shapes"), RUN_DIR=str(tmp_path / "run"), **SHORT)
    began = time.perf_counter()
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "demo.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)
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
