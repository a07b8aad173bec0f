"""Per-attribute scores on synth-shapes: zero-shot color/shape accuracy and caption color/shape accuracy, on
inputs whose right answers are known (a prediction with the right color and the wrong shape counts for color
only), and evaluate() reporting them end to end with a stand-in model."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from megacoca.data import shapes
from megacoca.eval import runner
from megacoca.eval.captioning import (
    caption_match_rate,
    shapes_caption_color_matches,
    shapes_caption_matches,
    shapes_caption_shape_matches,
)
from megacoca.eval.zeroshot import attribute_accuracy

COLOR_OF = [color for color, _ in shapes.CLASSES]
SHAPE_OF = [shape for _, shape in shapes.CLASSES]


def one_hot_logits(predicted):
    return F.one_hot(torch.tensor(predicted), len(shapes.CLASSES)).float()


def cls(color, shape):
    return shapes.class_index(color, shape)


# ------------------------------------------------------------------------------------------------ zero-shot
def test_attribute_accuracy_counts_color_and_shape_separately():
    labels = torch.tensor([cls("red", "circle"), cls("red", "circle"), cls("blue", "cross"), cls("green", "square")])
    predicted = [
        cls("red", "circle"),  # both right
        cls("red", "square"),  # color right, shape wrong
        cls("cyan", "cross"),  # shape right, color wrong
        cls("purple", "triangle"),  # both wrong
    ]
    logits = one_hot_logits(predicted)
    assert attribute_accuracy(logits, labels, COLOR_OF) == 0.5
    assert attribute_accuracy(logits, labels, SHAPE_OF) == 0.5
    assert attribute_accuracy(logits, labels, list(range(24))) == 0.25  # the class itself: top-1


def test_attribute_accuracy_of_a_color_only_model():
    # Every image's predicted class has its color and always the shape "circle": color 1, shape 1/4.
    labels = torch.arange(24)
    logits = one_hot_logits([cls(COLOR_OF[i], "circle") for i in range(24)])
    assert attribute_accuracy(logits, labels, COLOR_OF) == 1.0
    assert attribute_accuracy(logits, labels, SHAPE_OF) == 0.25


def test_attribute_accuracy_takes_the_argmax_of_real_logits():
    logits = torch.full((2, 24), -1.0)
    logits[0, cls("yellow", "triangle")] = 0.9  # true class is yellow circle
    logits[0, cls("yellow", "circle")] = 0.8
    logits[1, cls("blue", "square")] = 0.3  # true class is red square
    labels = torch.tensor([cls("yellow", "circle"), cls("red", "square")])
    assert attribute_accuracy(logits, labels, COLOR_OF) == 0.5
    assert attribute_accuracy(logits, labels, SHAPE_OF) == 0.5


def test_attribute_accuracy_checks_its_inputs():
    with pytest.raises(ValueError, match="labels"):
        attribute_accuracy(torch.zeros(3, 24), torch.zeros(2), COLOR_OF)
    with pytest.raises(ValueError, match="attribute values"):
        attribute_accuracy(torch.zeros(3, 24), torch.zeros(3), COLOR_OF[:6])
    assert math.isnan(attribute_accuracy(torch.zeros(0, 24), torch.zeros(0), COLOR_OF))


# ------------------------------------------------------------------------------------------------- captions
RED_CIRCLE = {"objects": [{"color": "red", "shape": "circle", "size": "small"}], "relation": None}


@pytest.mark.parametrize("caption, color, shape", [
    ("a photo of a small red circle", True, True),
    ("Red circle.", True, True),
    ("a photo of a red square", True, False),
    ("a blue circle", False, True),
    ("a green triangle", False, False),
    ("a photo of a circle", False, True),  # no color named
    ("a red", True, False),  # no shape named
    ("a red circle and a blue circle", False, True),  # an extra color
    ("two red circles", True, True),  # plural shape
    ("", False, False),
])
def test_caption_attribute_matches(caption, color, shape):
    assert shapes.caption_names_attribute(caption, RED_CIRCLE, "color") is color
    assert shapes.caption_names_attribute(caption, RED_CIRCLE, "shape") is shape
    assert shapes_caption_color_matches(caption, RED_CIRCLE) is color
    assert shapes_caption_shape_matches(caption, RED_CIRCLE) is shape
    assert shapes.caption_names_attribute(caption, ("red", "circle"), "color") is color  # tuple form
    if shapes.caption_matches(caption, RED_CIRCLE):  # a full match is right on both
        assert color and shape


def test_caption_attribute_matches_two_objects():
    two = {"objects": [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "square"}]}
    assert shapes.caption_names_attribute("a blue circle left of a red square", two, "color")
    assert shapes.caption_names_attribute("a blue circle left of a red square", two, "shape")
    assert not shapes.caption_matches("a blue circle left of a red square", two)  # pairs swapped
    assert not shapes.caption_names_attribute("a red circle left of a red square", two, "color")


def test_caption_attribute_rejects_unknown_attribute():
    with pytest.raises(ValueError, match="attribute"):
        shapes.caption_names_attribute("a red circle", RED_CIRCLE, "size")


def test_caption_rates_per_attribute():
    captions = ["a red circle", "a red square", "a blue circle", "a green cross"]
    attributes = [RED_CIRCLE] * 4
    assert caption_match_rate(captions, attributes, shapes_caption_matches)[0] == 0.25
    assert caption_match_rate(captions, attributes, shapes_caption_color_matches)[0] == 0.5
    assert caption_match_rate(captions, attributes, shapes_caption_shape_matches)[0] == 0.5


# -------------------------------------------------------------------------------------- evaluate() end to end
class StandIn(nn.Module):
    """encode_image returns the one-hot embedding of the class written in pixel [0, 0, 0]; encode_text a fixed
    vector per text. With class embeddings = the identity, zero-shot predicts exactly that class."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def encode_image(self, images, normalize=True):
        return F.one_hot(images[:, 0, 0, 0].round().long(), 24).float()

    def encode_text(self, text, normalize=True):
        return F.normalize(torch.ones(text.shape[0], 24), dim=-1)


class Tokenizer:
    def encode(self, texts):
        return torch.zeros(len(texts), 4, dtype=torch.long)


def test_evaluate_reports_attribute_accuracies(monkeypatch):
    truth = [("red", "circle"), ("red", "circle"), ("blue", "cross"), ("green", "square"), ("yellow", "triangle")]
    predicted = [("red", "circle"), ("red", "square"), ("cyan", "cross"), ("purple", "triangle"),
                 ("yellow", "triangle")]
    captions = ["a red circle", "a red square", "a cyan cross", "a purple triangle", "a photo of a yellow cross"]
    images = torch.zeros(len(truth), 3, 8, 8)
    for i, (color, shape) in enumerate(predicted):
        images[i, 0, 0, 0] = cls(color, shape)
    attributes = [{"objects": [{"color": c, "shape": s, "size": "small"}], "relation": None, "class": cls(c, s)}
                  for c, s in truth]
    eval_set = runner.EvalSet(images, [f"a {c} {s}" for c, s in truth], attributes, [str(i) for i in range(5)])
    monkeypatch.setattr(runner, "class_embeddings", lambda *args, **kwargs: torch.eye(24))
    queue = list(captions)  # evaluate captions in order, batch by batch

    def generate_captions(model, batch, tokenizer, **kwargs):
        return [queue.pop(0) for _ in range(batch.shape[0])]

    monkeypatch.setattr(runner, "generate_captions", generate_captions)
    results = runner.evaluate(StandIn(), Tokenizer(), eval_set, batch_size=2, num_examples=0)
    assert results["zeroshot_top1"] == pytest.approx(2 / 5)
    assert results["zeroshot_color_acc"] == pytest.approx(3 / 5)  # rows 0, 1, 4
    assert results["zeroshot_shape_acc"] == pytest.approx(3 / 5)  # rows 0, 2, 4
    assert results["caption_match"] == pytest.approx(1 / 5)  # row 0
    assert results["caption_color_acc"] == pytest.approx(3 / 5)  # rows 0, 1, 4
    assert results["caption_shape_acc"] == pytest.approx(2 / 5)  # rows 0, 2
    assert all(results[key] is not None for key in runner.TRAIN_EVAL_KEYS)
    table = runner.headline(results)
    assert "shape right" in table and "color right" in table


def test_evaluate_without_shapes_attributes_reports_none(monkeypatch):
    eval_set = runner.EvalSet(torch.zeros(3, 3, 8, 8), ["x", "y", "z"], [None] * 3, ["0", "1", "2"])
    monkeypatch.setattr(runner, "generate_captions",
                        lambda model, batch, tokenizer, **kwargs: ["a red circle"] * batch.shape[0])
    results = runner.evaluate(StandIn(), Tokenizer(), eval_set, batch_size=4, num_examples=0)
    for key in ("zeroshot_color_acc", "zeroshot_shape_acc", "caption_color_acc", "caption_shape_acc"):
        assert results[key] is None, key
    assert "n/a" in runner.headline(results)
