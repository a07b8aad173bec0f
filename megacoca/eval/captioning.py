"""Caption generation for evaluation and its scoring on synth-shapes.

Captions come from `megacoca.models.coca.generate.generate` (KV-cached). `greedy_captions_uncached` is a
slow reference that re-runs the text decoder on the whole prefix at every step; the tests check the cached
generator against it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from megacoca.data.shapes import caption_matches, caption_names_attribute
from megacoca.models.coca.generate import generate


@torch.no_grad()
def greedy_captions_uncached(model, images: torch.Tensor, *, max_new_tokens: int, bos_id: int, eos_id: int,
                             pad_id: int) -> torch.Tensor:
    """(B, T) generated ids after bos, without a cache: the reference for the cached path. A row ends at eos
    or at pad (as `generate` does with stop_on_pad); pads follow."""
    _, image_tokens = model.image_stage(images)
    batch = images.shape[0]
    prefix = torch.full((batch, 1), bos_id, dtype=torch.long, device=images.device)
    done = torch.zeros(batch, dtype=torch.bool, device=images.device)
    max_new_tokens = min(max_new_tokens, model.cfg.context_length)
    for _ in range(max_new_tokens):
        _, token_outputs = model.text(prefix)
        hidden = model.decoder(token_outputs, image_tokens)
        logits = model.caption_head(hidden[:, -1:])[:, 0]
        nxt = logits.argmax(dim=-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        prefix = torch.cat([prefix, nxt[:, None]], dim=1)
        done |= (nxt == eos_id) | (nxt == pad_id)
        if bool(done.all()):
            break
    return prefix[:, 1:]


@torch.no_grad()
def generate_captions(model, images: torch.Tensor, tokenizer, *, max_new_tokens: int = 20,
                      strategy: str = "greedy", **kwargs) -> list[str]:
    """Decoded captions for a batch of images (greedy by default)."""
    ids_kwargs = dict(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    max_new_tokens = min(max_new_tokens, model.cfg.context_length)
    ids = generate(model, images, max_new_tokens=max_new_tokens, strategy=strategy, **ids_kwargs, **kwargs)
    return [tokenizer.decode(row) for row in ids.cpu()]


def caption_match_rate(captions: Sequence[str], attributes: Sequence, matches: Callable[[str, object], bool]
                       ) -> tuple[float, list[bool]]:
    """(fraction of captions that `matches(caption, attributes)`, per-caption results)."""
    if len(captions) != len(attributes):
        raise ValueError(f"{len(captions)} captions for {len(attributes)} attribute records")
    hits = [bool(matches(c, a)) for c, a in zip(captions, attributes)]
    return (sum(hits) / len(hits) if hits else float("nan")), hits


def shapes_caption_matches(caption: str, attributes) -> bool:
    """synth-shapes scoring: the caption names the right color AND shape of every object, and no other."""
    return caption_matches(caption, attributes)


def shapes_caption_color_matches(caption: str, attributes) -> bool:
    """synth-shapes, color alone: the caption names the right color of every object and no other."""
    return caption_names_attribute(caption, attributes, "color")


def shapes_caption_shape_matches(caption: str, attributes) -> bool:
    """synth-shapes, shape alone: the caption names the right shape of every object and no other."""
    return caption_names_attribute(caption, attributes, "shape")
