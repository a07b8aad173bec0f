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


class OracleModel(torch.nn.Module):
    """Embeds an image as the one-hot of its class (painted into the pixels by `oracle_eval_set`) and a text as
    the one-hot of the (color, shape) it names, shifted by `shape_error` shapes for images: a model whose scores
    are known exactly."""

    def __init__(self, tokenizer, shape_error: int = 0):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # evaluate() reads the device from the parameters
        self.tokenizer, self.shape_error = tokenizer, shape_error

    def encode_image(self, images, normalize=True):
        classes = images[:, 0, 0, 0].round().long()
        color, shape = classes // len(shapes.SHAPES), classes % len(shapes.SHAPES)
        wrong = color * len(shapes.SHAPES) + (shape + self.shape_error) % len(shapes.SHAPES)
        return torch.nn.functional.one_hot(wrong, len(shapes.CLASSES)).float()

    def encode_text(self, text, normalize=True):
        rows = []
        for ids in text:
            colors, named, _ = shapes.caption_pairs(self.tokenizer.decode(ids))
            rows.append(shapes.class_index(colors[0], named[0]))
        return torch.nn.functional.one_hot(torch.tensor(rows), len(shapes.CLASSES)).float()


def oracle_eval_set():
    """One sample per class; each image holds its class index in every pixel, each caption names its class."""
    rng = __import__("numpy").random.default_rng(0)
    captions, attributes = [], []
    for index, (color, shape) in enumerate(shapes.CLASSES):
        captions.append(shapes.make_sample(rng, 32, 1, cls=index)[1])
        attributes.append({"objects": [{"color": color, "shape": shape}], "class": index})
    images = torch.arange(len(shapes.CLASSES)).float()[:, None, None, None].expand(-1, 3, 8, 8).clone()
    return runner.EvalSet(images, captions, attributes, [f"k{i}" for i in range(len(captions))])


def test_evaluate_scores_an_oracle_exactly(monkeypatch):
    """A perfect model scores 1.0 on every metric; one that names the right color and the wrong shape scores 0 on
    zero-shot top-1, retrieval R@1 and caption match. Values, not ranges: a metric wired to the wrong rows,
    classes or captions fails here."""
    tokenizer = WordTokenizer()
    eval_set = oracle_eval_set()
    assert all(shapes.caption_matches(c, a) for c, a in zip(eval_set.captions, eval_set.attributes))
    wrong_shape = [f"a {color} {shapes.SHAPES[(shapes.SHAPES.index(shape) + 1) % 4]}" for color, shape in shapes.CLASSES]
    for shape_error, captions, expected in ((0, eval_set.captions, 1.0), (1, wrong_shape, 0.0)):
        stream = iter(captions)  # evaluate() captions the images in order, batch by batch
        monkeypatch.setattr(runner, "generate_captions", lambda model, images, tokenizer, **kw: [next(stream)
                                                                                             for _ in images])
        results = runner.evaluate(OracleModel(tokenizer, shape_error), tokenizer, eval_set, batch_size=5,
                                  num_examples=2)
        for key in ("zeroshot_top1", "i2t_r1", "t2i_r1", "class_i2t_r1", "class_t2i_r1", "caption_match"):
            assert results[key] == expected, (shape_error, key, results[key])
        assert results["num_zeroshot"] == 24 and results["num_captioned"] == 24
        assert [s["generated"] for s in results["samples"]] == captions[:2]
        assert [s["match"] for s in results["samples"]] == [bool(expected)] * 2
    # one-hot embeddings tie the true class with 22 others at 0, and ties count against it: top-5 misses too
    assert results["zeroshot_top5"] == 0.0 and results["i2t_r5"] == 0.0


def test_evaluate_a_random_model(val_shards):
    tokenizer = WordTokenizer()
    torch.manual_seed(0)
    model = build_model("coca_tiny", image_size=32, patch_size=8, vocab_size=tokenizer.vocab_size,
                        context_length=tokenizer.context_length, kernels="torch")
    model.train()
    eval_set = runner.load_eval_set(val_shards, image_size=32)
    results = runner.evaluate(model, tokenizer, eval_set, batch_size=8, max_new_tokens=6, num_examples=4,
                              generative_zeroshot=True)
    assert model.training  # restored
    for key in ("zeroshot_top1", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "caption_match",
                "class_i2t_r1", "class_t2i_r10", "zeroshot_generative_top1", "zeroshot_generative_shape_acc"):
        assert 0.0 <= results[key] <= 1.0, key
    assert results["num_samples"] == 30 and results["num_zeroshot"] == 30 and results["num_captioned"] == 30
    assert len(results["samples"]) == 4 and set(results["samples"][0]) == {"key", "reference", "generated", "match"}
    json.dumps(results)  # JSON-serialisable as is
    assert "zero-shot top-1" in runner.headline(results) and "generative zero-shot" in runner.headline(results)


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
    with pytest.raises(FileNotFoundError, match="is neither a model directory"):
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
