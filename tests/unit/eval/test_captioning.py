"""Caption scoring on synth-shapes attributes and the uncached greedy reference."""

import pytest
import torch

from megacoca.data import shapes
from megacoca.eval.captioning import caption_match_rate, greedy_captions_uncached, shapes_caption_matches
from megacoca.models.coca import build_model
from megacoca.models.coca.generate import generate



@pytest.mark.parametrize("caption, ok", [
    ("a photo of a small red circle", True),
    ("there is a red circle", True),
    ("a red square", False),          # wrong shape
    ("a blue circle", False),         # wrong color
    ("a red circle left of a blue square", False),  # names another object
    ("a circle", False),              # no color
    ("", False),
])
def test_shapes_caption_needs_color_and_shape(caption, ok):
    attributes = {"objects": [{"color": "red", "shape": "circle", "size": "small"}], "class": 0}
    assert shapes_caption_matches(caption, attributes) is ok


def test_caption_match_rate():
    attributes = [{"objects": [{"color": "red", "shape": "circle"}]}, {"objects": [{"color": "blue", "shape": "cross"}]}]
    rate, hits = caption_match_rate(["a red circle", "a blue square"], attributes, shapes_caption_matches)
    assert rate == 0.5 and hits == [True, False]
    with pytest.raises(ValueError):
        caption_match_rate(["a"], [], shapes_caption_matches)


def _tiny_model():
    torch.manual_seed(0)
    return build_model("coca_tiny", image_size=32, patch_size=8, vocab_size=40, context_length=10,
                       kernels="torch").eval()


def test_greedy_reference_stops_at_eos_and_pads_after():
    model = _tiny_model()
    images = torch.randn(3, 3, 32, 32)
    ids = greedy_captions_uncached(model, images, max_new_tokens=6, bos_id=1, eos_id=2, pad_id=0)
    assert ids.shape[0] == 3 and ids.shape[1] <= 6
    for row in ids.tolist():
        ends = [i for i, t in enumerate(row) if t in (0, 2)]
        if ends:
            assert all(t == 0 for t in row[ends[0] + 1:])


def test_cached_generate_matches_the_uncached_reference():
    model = _tiny_model()
    images = torch.randn(4, 3, 32, 32)
    ref = greedy_captions_uncached(model, images, max_new_tokens=7, bos_id=1, eos_id=2, pad_id=0)
    out = generate(model, images, max_new_tokens=7, strategy="greedy", bos_id=1, eos_id=2, pad_id=0)
    if out.shape[1] and bool((out[:, 0] == 1).all()):  # a generator that returns the bos too
        out = out[:, 1:]
    width = max(ref.shape[1], out.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=0)  # noqa: E731
    eos_cut = lambda row: row[: row.index(2) + 1] if 2 in row else row  # noqa: E731
    assert [eos_cut(r) for r in pad(out).tolist()] == [eos_cut(r) for r in pad(ref).tolist()]
