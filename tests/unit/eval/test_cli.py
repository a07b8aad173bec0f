"""`megacoca eval` on a DeepSpeed-layout checkpoint (config from the client state) and synth-shapes shards."""

import json
import os

import pytest
import torch

from megacoca.cli import main as cli
from megacoca.data import shapes
from megacoca.eval import runner
from megacoca.models.coca import CoCa, get_flavor



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """val shards, a SentencePiece tokenizer, and a ZeRO-0 style checkpoint dir (what megacoca saves)."""
    from megacoca.data.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("evalcli")
    shapes.write_split(str(root), "val", 24, image_size=32, shard_size=12)
    captions = [shapes.make_sample(__import__("numpy").random.default_rng(i), 32, 1 + i % 2)[1] for i in range(300)]
    tokenizer = train_sentencepiece(captions, str(root / "tok"), vocab_size=64, model_type="bpe")
    overrides = dict(image_size=32, patch_size=8, vocab_size=64, context_length=16, kernels="torch")
    torch.manual_seed(0)
    model = CoCa(get_flavor("coca_tiny", **overrides))
    job = {"name": "t", "model": {"flavor": "coca_tiny", "overrides": overrides}, "schedule": {"steps": 1}}
    tag_dir = root / "run" / "checkpoints" / "step00000001"
    os.makedirs(tag_dir)
    torch.save({"module": model.state_dict(), "step": 1, "dp_size": 1, "config": job},
               tag_dir / "mp_rank_00_model_states.pt")
    (tag_dir / "COMPLETE").write_text("1\n")
    (root / "run" / "checkpoints" / "latest").write_text("step00000001")
    return root, tokenizer, model


def test_load_model_for_eval_reads_config_and_weights(setup):
    root, _, model = setup
    for path in (root / "run" / "checkpoints", root / "run" / "checkpoints" / "step00000001"):
        loaded = runner.load_model_for_eval(str(path))
        assert loaded.cfg.image_size == 32 and loaded.cfg.vocab_size == 64 and not loaded.training
        for (name, a), (_, b) in zip(loaded.state_dict().items(), model.state_dict().items()):
            assert torch.equal(a, b), name


def test_eval_cli_writes_json_and_curves(setup, tmp_path, capsys):
    """The CLI's numbers are the numbers of the checkpointed model: equal, metric by metric, to evaluate() on the
    model the fixture saved (a CLI that loaded other weights, another config or other shards would differ)."""
    root, tokenizer, model = setup
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 3.0 / s}) + "\n" for s in (1, 2, 3)))
    out = tmp_path / "eval.json"
    code = cli(["eval", "--checkpoint", str(root / "run" / "checkpoints"), "--shards", str(root / "val"),
                "--tokenizer", tokenizer, "--out", str(out), "--max-new-tokens", "6", "--max-samples", "20",
                "--caption-samples", "10", "--metrics", str(metrics), "--curves", str(tmp_path / "curves.png"),
                "--generative-zeroshot"])
    assert code == 0
    results = json.loads(out.read_text())
    from megacoca.data.tokenizer import load_tokenizer

    eval_set = runner.load_eval_set(str(root / "val"), 32, 20)
    expected = runner.evaluate(model.eval(), load_tokenizer(tokenizer, 16), eval_set, max_new_tokens=6,
                               caption_samples=10, generative_zeroshot=True)
    for key in ("zeroshot_top1", "zeroshot_top5", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
                "class_i2t_r1", "class_t2i_r1", "caption_match", "num_samples", "num_captioned", "samples",
                "zeroshot_generative_top1", "zeroshot_generative_color_acc", "zeroshot_generative_shape_acc"):
        assert results[key] == expected[key], key
    assert results["num_samples"] == 20 and results["num_captioned"] == 10
    assert os.path.getsize(tmp_path / "curves.png") > 1000
    printed = capsys.readouterr().out
    assert f"{results['zeroshot_top1']:.3f}" in printed and "zero-shot top-1" in printed


def test_eval_cli_errors_are_one_line_and_exit_2(setup, tmp_path, capsys):
    root, tokenizer, _ = setup
    base = ["eval", "--shards", str(root / "val"), "--tokenizer", tokenizer]
    assert cli(base + ["--checkpoint", str(tmp_path / "missing")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    wrong = ["--flavor", "coca_tiny", "--model-set", "vocab_size=8", "--model-set", "image_size=32"]
    assert cli(base + ["--checkpoint", str(root / "run" / "checkpoints")] + wrong) == 2
    err = capsys.readouterr().err
    assert "does not fit the model" in err and len(err.strip().splitlines()) == 1
