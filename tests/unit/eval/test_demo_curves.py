"""scripts/demo_curves.py draws several demo runs (their metrics.jsonl and eval.json) into one PNG."""

import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))), "scripts"))

import demo_curves  # noqa: E402


def _fake_run(run_dir, seed: int, final: bool = True):
    """A demo-shaped run: a loss every 10 steps, a periodic eval every 300, the final eval.json."""
    os.makedirs(run_dir)
    with open(run_dir / "metrics.jsonl", "w") as handle:
        for step in range(10, 1201, 10):
            handle.write(json.dumps({"step": step, "loss": 6 * math.exp(-step / (400 + 50 * seed)) + 2,
                                     "lr": 1e-3}) + "\n")
            if step % 300 == 0:
                handle.write(json.dumps({"step": step, "eval/zeroshot_top1": step / 1250,
                                         "eval/caption_match": step / 1300}) + "\n")
        handle.write("not json\n")
    if final:
        (run_dir / "eval.json").write_text(json.dumps({"zeroshot_top1": 0.96, "caption_match": 0.98}))


def test_draws_every_run_into_one_png(tmp_path):
    runs = [tmp_path / f"demo_s{seed}" for seed in range(3)]
    for seed, run in enumerate(runs):
        _fake_run(run, seed, final=seed != 2)  # a run without eval.json draws its periodic evals only
    out = tmp_path / "images" / "curves.png"
    assert demo_curves.main([*map(str, runs), "--out", str(out), "--labels", "seed 0", "seed 1", "seed 2"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_refuses_a_run_without_training_records_and_wrong_labels(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit, match="no training records"):
        demo_curves.draw([str(tmp_path / "empty")], str(tmp_path / "x.png"))
    _fake_run(tmp_path / "run", 0)
    with pytest.raises(SystemExit, match="2 labels for 1 runs"):
        demo_curves.draw([str(tmp_path / "run")], str(tmp_path / "x.png"), labels=["a", "b"])
