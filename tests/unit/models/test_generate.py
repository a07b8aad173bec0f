"""Cached caption generation: equal to re-running the full model each step; beam, sampling and token rules."""

import pytest
import torch
import torch.nn.functional as F

from megacoca.config.model import CoCaConfig
from megacoca.models.coca import CoCa
from megacoca.models.coca.generate import generate

PAD, BOS = 0, 1
VOCAB = 40


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(layout: str, **changes) -> CoCaConfig:
    open_clip = layout == "open_clip"
    base = dict(
        image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2, vision_mlp_dim=64,
        caption_queries=8, pooler_heads=2, vocab_size=VOCAB, context_length=16, text_width=32, text_heads=2,
        text_mlp_dim=64, text_layers=2, decoder_layers=2, embed_dim=16, kernels="torch",
        pooler_layout=layout, legacy_cls_mask=open_clip, text_tokens_after_ln=not open_clip,
        decoder_mlp_after_self_attn=open_clip, vision_class_token=open_clip, decoder_bias=open_clip,
    )
    base.update(changes)
    return CoCaConfig(**base)


def make_model(layout: str, seed: int = 0) -> CoCa:
    torch.manual_seed(seed)
    model = CoCa(tiny_config(layout)).eval()
    with torch.no_grad():  # peaked next-token distributions, so captions differ between images and steps
        model.caption_head.weight.normal_(std=1.0, generator=torch.Generator().manual_seed(seed))
        model.caption_head.weight[PAD] = 0.0  # rows end on the chosen eos, not on an early pad (also a stop)
    return model


def make_images(cfg: CoCaConfig, batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def next_token_logits(model: CoCa, images: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
    """Uncached: the full forward on the prefix; a dummy last token makes the logits cover the prefix's end."""
    dummy = torch.full((seqs.shape[0], 1), VOCAB - 1, dtype=torch.long)
    return model(images, torch.cat([seqs, dummy], dim=1), caption_loss=False)["logits"][:, -1].float()


def uncached_greedy(model, images, *, max_new_tokens, eos_id, min_new_tokens=0, repetition_penalty=1.0):
    seqs = torch.full((images.shape[0], 1), BOS, dtype=torch.long)
    finished = torch.zeros(images.shape[0], dtype=torch.bool)
    for step in range(max_new_tokens):
        scores = next_token_logits(model, images, seqs)
        if repetition_penalty != 1.0:
            seen = scores.gather(1, seqs)
            scores = scores.scatter(1, seqs, torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty))
        if step < min_new_tokens:
            scores[:, eos_id] = -float("inf")
        chosen = torch.where(finished, PAD, scores.argmax(-1))
        seqs = torch.cat([seqs, chosen[:, None]], dim=1)
        finished |= (chosen == eos_id) | (chosen == PAD)
        if finished.all():
            break
    return seqs


def pick_eos(model, images, max_new_tokens=10) -> int:
    """An eos id that some rows emit early and others late or never: the token row 0 emits at step 3."""
    tokens = uncached_greedy(model, images, max_new_tokens=max_new_tokens, eos_id=VOCAB - 1)
    return int(tokens[0, 4])


@torch.no_grad()
def sequence_logprob(model, images, seqs, eos_id) -> torch.Tensor:
    """Sum of the model's log-probabilities of each row's new tokens, up to and including its stop token."""
    logits = model(images, seqs, caption_loss=False)["logits"].float()
    targets = seqs[:, 1:]
    logprobs = F.log_softmax(logits, dim=-1).gather(2, targets[:, :, None]).squeeze(2)
    stop = (targets == eos_id) | (targets == PAD)
    after_stop = (stop.cumsum(1) - stop.long()) > 0
    return logprobs.masked_fill(after_stop, 0.0).sum(1)


@pytest.mark.parametrize("layout", ["paper", "open_clip"])
def test_cached_greedy_equals_uncached_greedy(layout):
    model = make_model(layout)
    images = make_images(model.cfg, 4)
    eos = pick_eos(model, images)
    expected = uncached_greedy(model, images, max_new_tokens=12, eos_id=eos)
    got = generate(model, images, max_new_tokens=12, bos_id=BOS, eos_id=eos, pad_id=PAD)
    assert torch.equal(got, expected)
    assert (got == eos).any(dim=1).sum() >= 1, "the test should exercise rows that finish early"


def test_cached_greedy_equals_uncached_with_min_length_and_repetition_penalty():
    model = make_model("open_clip", seed=3)
    images = make_images(model.cfg, 3)
    eos = pick_eos(model, images)
    options = dict(max_new_tokens=10, eos_id=eos, min_new_tokens=6, repetition_penalty=1.7)
    expected = uncached_greedy(model, images, **options)
    got = generate(model, images, bos_id=BOS, pad_id=PAD, **options)
    assert torch.equal(got, expected)
    assert not (got[:, 1:7] == eos).any()


def test_output_layout_and_training_flag_restored():
    model = make_model("paper").train()
    images = make_images(model.cfg, 3)
    eos = pick_eos(model.eval(), images)
    model.train()
    out = generate(model, images, max_new_tokens=8, bos_id=BOS, eos_id=eos, pad_id=PAD)
    assert model.training
    assert out.dtype == torch.long and out.shape[0] == 3 and out.shape[1] <= 9
    assert (out[:, 0] == BOS).all()
    for row in out.tolist():
        if eos in row:
            assert all(token == PAD for token in row[row.index(eos) + 1 :])


def test_max_new_tokens_beyond_context_is_refused():
    model = make_model("paper")
    with pytest.raises(ValueError, match="context_length"):
        generate(model, make_images(model.cfg, 1), max_new_tokens=17, bos_id=BOS, eos_id=2)


@pytest.mark.parametrize("layout", ["paper", "open_clip"])
def test_beam_with_one_beam_is_greedy(layout):
    model = make_model(layout)
    images = make_images(model.cfg, 4)
    eos = pick_eos(model, images)
    greedy = generate(model, images, max_new_tokens=12, bos_id=BOS, eos_id=eos, pad_id=PAD)
    beam = generate(model, images, max_new_tokens=12, strategy="beam", num_beams=1, bos_id=BOS, eos_id=eos, pad_id=PAD)
    assert torch.equal(beam, greedy)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_finds_sequences_at_least_as_likely_as_greedy(seed):
    model = make_model("open_clip", seed=seed)
    images = make_images(model.cfg, 8, seed=seed + 10)  # 8 images: beam beats greedy on at least one of them
    eos = pick_eos(model, images)
    options = dict(max_new_tokens=10, bos_id=BOS, eos_id=eos, pad_id=PAD)
    greedy = generate(model, images, **options)
    beam = generate(model, images, strategy="beam", num_beams=4, length_penalty=0.0, **options)
    width = max(greedy.shape[1], beam.shape[1])
    greedy, beam = (F.pad(t, (0, width - t.shape[1]), value=PAD) for t in (greedy, beam))
    greedy_lp, beam_lp = sequence_logprob(model, images, greedy, eos), sequence_logprob(model, images, beam, eos)
    assert (beam_lp >= greedy_lp - 1e-4).all(), (beam_lp, greedy_lp)
    assert (beam_lp > greedy_lp + 1e-4).any(), "beam search should improve on greedy somewhere"


def test_beam_search_treats_images_independently():
    model = make_model("paper")
    images = make_images(model.cfg, 3)
    eos = pick_eos(model, images)
    options = dict(max_new_tokens=10, strategy="beam", num_beams=3, bos_id=BOS, eos_id=eos, pad_id=PAD)
    together = generate(model, images, **options)
    for index in range(3):
        alone = generate(model, images[index : index + 1], **options)
        assert torch.equal(alone[0], together[index, : alone.shape[1]])
        assert (together[index, alone.shape[1] :] == PAD).all()


def test_sampling_is_deterministic_under_a_seed():
    model = make_model("open_clip")
    images = make_images(model.cfg, 4)
    eos = pick_eos(model, images)
    options = dict(max_new_tokens=12, strategy="sample", top_k=10, top_p=0.9, temperature=1.3, bos_id=BOS, eos_id=eos)
    first = generate(model, images, generator=torch.Generator().manual_seed(7), **options)
    second = generate(model, images, generator=torch.Generator().manual_seed(7), **options)
    other = generate(model, images, generator=torch.Generator().manual_seed(8), **options)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("filters", [dict(top_k=1), dict(top_p=1e-6)])
def test_sampling_with_one_candidate_is_greedy(filters):
    model = make_model("paper")
    images = make_images(model.cfg, 4)
    eos = pick_eos(model, images)
    options = dict(max_new_tokens=12, bos_id=BOS, eos_id=eos, pad_id=PAD)
    greedy = generate(model, images, **options)
    sampled = generate(model, images, strategy="sample", generator=torch.Generator().manual_seed(0), **filters, **options)
    assert torch.equal(sampled, greedy)
