"""Caption scoring on synth-shapes attributes and the uncached greedy reference."""

import pytest
import torch

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


BOS, EOS, PAD = 1, 2, 0
# Captions of different lengths (eos included): the eos path must end each row at its own step.
TARGETS = [[5, 9, EOS], [7, 7, 12, 30, 4, EOS], [22, EOS], [3, 18, 18, 6, 11, 27, 8, EOS]]


@pytest.fixture(scope="module")
def memorised():
    """A tiny CoCa trained (captioning loss only, ~1 s) until greedy decoding of each of 4 images reproduces its
    own caption: a model that really emits eos, at a different step per row."""
    torch.manual_seed(0)
    model = build_model("coca_tiny", image_size=32, patch_size=8, vocab_size=40, context_length=10, kernels="torch",
                        vision_width=32, vision_layers=1, vision_heads=2, vision_mlp_dim=64, caption_queries=4,
                        pooler_heads=2, text_width=32, text_heads=2, text_mlp_dim=64, text_layers=1, decoder_layers=1,
                        embed_dim=32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    images = torch.randn(len(TARGETS), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    text = torch.full((len(TARGETS), 10), PAD)
    for row, target in enumerate(TARGETS):
        text[row, : len(target) + 1] = torch.tensor([BOS] + target)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(400):
        out = model(images, text)
        loss = out["caption_loss_sum"] / out["caption_tokens"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    torch.set_num_threads(threads)
    print(f"memorised in {step + 1} steps, loss {loss.item():.4f}")
    return model.eval(), images


def expected_rows(width: int) -> list[list[int]]:
    return [target + [PAD] * (width - len(target)) for target in TARGETS]


def test_greedy_reference_stops_at_eos_and_pads_after(memorised):
    model, images = memorised
    ids = greedy_captions_uncached(model, images, max_new_tokens=9, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    longest = max(len(t) for t in TARGETS)
    assert ids.shape == (len(TARGETS), longest)  # stopped when the last row ended, not at max_new_tokens
    assert ids.tolist() == expected_rows(longest)


def test_cached_generate_matches_the_memorised_captions(memorised):
    model, images = memorised
    out = generate(model, images, max_new_tokens=9, strategy="greedy", bos_id=BOS, eos_id=EOS, pad_id=PAD)
    assert out[:, 0].tolist() == [BOS] * len(TARGETS)
    assert out[:, 1:].tolist() == expected_rows(out.shape[1] - 1)
    # One row at a time (no other row keeps the batch running) and in another order: the same captions.
    for row in (2, 0):
        alone = generate(model, images[row:row + 1], max_new_tokens=9, bos_id=BOS, eos_id=EOS, pad_id=PAD)
        assert alone[0, 1:].tolist() == TARGETS[row]
    # A budget shorter than a caption cuts it without an eos.
    cut = generate(model, images, max_new_tokens=3, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    assert cut[1, 1:].tolist() == TARGETS[1][:3] and cut[0, 1:].tolist() == TARGETS[0]


def test_cached_generate_matches_the_uncached_reference_on_a_random_model():
    """Random weights (no eos in sight): the cached and uncached decoders agree token for token."""
    torch.manual_seed(0)
    model = build_model("coca_tiny", image_size=32, patch_size=8, vocab_size=40, context_length=10,
                        kernels="torch").eval()
    images = torch.randn(4, 3, 32, 32)
    ref = greedy_captions_uncached(model, images, max_new_tokens=7, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    out = generate(model, images, max_new_tokens=7, strategy="greedy", bos_id=BOS, eos_id=EOS, pad_id=PAD)
    assert out[:, 1:].tolist() == ref.tolist()
