"""evaluate() end to end on a tiny random model and real synth-shapes shards; curves; the CLI's checks."""

import json
import os

import pytest
import torch

from megacoca.data import shapes
from megacoca.eval import runner
from megacoca.eval.plots import plot_curves, read_metrics
from megacoca.models.coca import build_model



class WordTokenizer:
    """Whitespace tokenizer over the synth-shapes words: pad 0, bos 1, eos 2."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, context_length=16):
        self.context_length = context_length
        words = "a an of photo there is image picture showing on noisy background one drawing small large".split()
        words += list(shapes.COLORS) + list(shapes.SHAPES) + "left right above below with".split()
        self.words = ["<pad>", "<s>", "</s>"] + words
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.vocab_size = len(self.words)

    def encode(self, texts):
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [1] + [self.ids[w] for w in text.split()][: self.context_length - 2] + [2]
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids):
        out = []
        for i in ids.tolist():
            if i == 2:
                break
            if i > 2:
                out.append(self.words[i])
        return " ".join(out)


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    shapes.write_split(str(out), "val", 30, image_size=32, shard_size=16)
    return str(out / "val")


def test_load_eval_set_reads_shards_in_order_with_attributes(val_shards):
    eval_set = runner.load_eval_set(val_shards, image_size=32)
    assert len(eval_set) == 30 and eval_set.images.shape == (30, 3, 32, 32)
    assert eval_set.keys == sorted(eval_set.keys)
    assert [runner.shapes_label(m) for m in eval_set.attributes] == [i % 24 for i in range(30)]
    assert len(runner.load_eval_set(val_shards, image_size=32, max_samples=5)) == 5


def test_shapes_label_from_class_or_single_object():
    assert runner.shapes_label({"class": 5}) == 5
    assert runner.shapes_label({"objects": [{"color": "red", "shape": "square"}]}) == shapes.class_index("red", "square")
    assert runner.shapes_label({"objects": [{"color": "red", "shape": "square"}] * 2}) is None
    assert runner.shapes_label(None) is None


def test_evaluate_a_random_model(val_shards):
    tokenizer = WordTokenizer()
    torch.manual_seed(0)
    model = build_model("coca_tiny", image_size=32, patch_size=8, vocab_size=tokenizer.vocab_size,
                        context_length=tokenizer.context_length, kernels="torch")
    model.train()
    eval_set = runner.load_eval_set(val_shards, image_size=32)
    results = runner.evaluate(model, tokenizer, eval_set, batch_size=8, max_new_tokens=6, num_examples=4)
    assert model.training  # restored
    for key in ("zeroshot_top1", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "caption_match",
                "class_i2t_r1", "class_t2i_r10"):
        assert 0.0 <= results[key] <= 1.0, key
    assert results["num_samples"] == 30 and results["num_zeroshot"] == 30 and results["num_captioned"] == 30
    assert len(results["samples"]) == 4 and set(results["samples"][0]) == {"key", "reference", "generated", "match"}
    json.dumps(results)  # JSON-serialisable as is
    assert "zero-shot top-1" in runner.headline(results)


def test_evaluate_without_shapes_attributes_skips_zeroshot_and_matching():
    tokenizer = WordTokenizer()
    model = build_model("coca_tiny", image_size=32, patch_size=8, vocab_size=tokenizer.vocab_size,
                        context_length=tokenizer.context_length, kernels="torch")
    eval_set = runner.EvalSet(torch.randn(3, 3, 32, 32), ["a red circle", "a blue cross", "one square"],
                              [None] * 3, ["k0", "k1", "k2"])
    results = runner.evaluate(model, tokenizer, eval_set, max_new_tokens=3, caption_samples=2)
    assert results["zeroshot_top1"] is None and results["caption_match"] is None
    assert results["num_captioned"] == 2 and results["i2t_r10"] == 1.0


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        runner.load_model_for_eval(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="neither a converted model dir"):
        runner.load_model_for_eval(str(tmp_path))


def test_plot_curves_from_metrics_jsonl(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with open(path, "w") as f:
        for step in range(10, 101, 10):
            f.write(json.dumps({"step": step, "loss": 5.0 / step, "loss_contrastive": 2.0 / step,
                                "loss_caption": 1.5 / step, "lr": 1e-3}) + "\n")
        f.write(json.dumps({"step": 50, "eval/zeroshot_top1": 0.4, "eval/caption_match": 0.3}) + "\n")
        f.write("not json\n")
    train, evals = read_metrics(str(path))
    assert len(train) == 10 and len(evals) == 1
    out = plot_curves(str(path), str(tmp_path / "curves.png"), final_eval={"zeroshot_top1": 0.9, "i2t_r1": 0.5})
    assert os.path.getsize(out) > 1000
