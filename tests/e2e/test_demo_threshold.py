"""The demo's learning threshold, fast: scripts/demo.sh end to end (synth-shapes, tokenizer, 2-rank ZeRO-3
training through the deepspeed launcher, held-out eval, curves) on a shorter schedule, asserting a lower but
clearly-above-chance bar (chance is 1/24 ~ 0.04). The full demo (`make demo`) asks for 0.50 / 0.60."""

import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The short schedule: smaller data and fewer steps than scripts/demo.sh's defaults, same model and recipe.
# Color is learned in ~150 steps (zero-shot ~0.25 = 6x chance with shape still at chance); shape takes ~25-30k
# samples to emerge (0.46 at step 600, 0.85 at 1200 in the full demo), beyond a 4-minute run. So the bar here
# is "color learned": 0.20, 5x chance.
SHORT = {
    "TRAIN_SAMPLES": "8000",
    "VAL_SAMPLES": "480",
    "STEPS": "400",
    "WARMUP": "30",
    "EVAL_EVERY": "400",
    "MIN_ZEROSHOT": "0.20",
    "MIN_CAPTION": "0.20",
}


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
    results = json.loads((tmp_path / "run" / "eval.json").read_text())
    print(f"short demo: {seconds:.0f}s, zeroshot_top1 {results['zeroshot_top1']:.3f}, "
          f"caption_match {results['caption_match']:.3f}, wall times {results['wall_times_s']}")
    assert results["zeroshot_top1"] >= float(SHORT["MIN_ZEROSHOT"])
    assert results["caption_match"] >= float(SHORT["MIN_CAPTION"])
    assert results["num_samples"] == int(SHORT["VAL_SAMPLES"])
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    assert losses[-1] < 0.5 * losses[0]
    assert any("eval/zeroshot_top1" in r for r in records)  # the trainer's periodic eval ran
