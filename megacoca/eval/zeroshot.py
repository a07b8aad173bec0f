"""Zero-shot classification: class embeddings from prompt templates, averaged, scored against images."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from megacoca.data.source_text import render


def class_prompts(classes: Sequence[str | Mapping[str, str]], templates: Sequence[str]) -> list[list[str]]:
    """Prompts per class: a class is a name (templates with `{}`) or a mapping of fields (`{color} {shape}`)."""
    if not templates:
        raise ValueError("zero-shot classification needs at least one template")
    prompts = []
    for cls in classes:
        if isinstance(cls, Mapping):
            prompts.append([t.format(**cls) for t in templates])
        else:
            prompts.append([t.format(cls) if "{}" in t else t.format(name=cls) for t in templates])
    return prompts


def named_class_prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """Prompts per class of a labelled set: every template (`{}` or `{c}` where the name goes, open_clip's ImageNet
    templates written out) with the class name in it (megacoca.data.source_text.render). Unlike `class_prompts`,
    a name or template holding other braces is taken literally."""
    if not templates:
        raise ValueError("zero-shot classification needs at least one template")
    return [[render(template, name) for template in templates] for name in class_names]


@torch.no_grad()
def prompt_embeddings(model, tokenizer, prompts: Sequence[Sequence[str]], batch_size: int = 256) -> torch.Tensor:
    """(C, E) L2-normalised: per class, the mean of its prompts' normalised text embeddings, renormalised (open_clip's
    zero-shot classifier). Every class has the same number of prompts."""
    count = len(prompts[0]) if prompts else 0
    if any(len(per_class) != count for per_class in prompts):
        raise ValueError("every class needs the same number of prompts")
    flat = [p for per_class in prompts for p in per_class]
    device = next(model.parameters()).device
    features = []
    for start in range(0, len(flat), batch_size):
        text = tokenizer.encode(flat[start:start + batch_size]).to(device)
        features.append(model.encode_text(text, normalize=True).float().cpu())
    features = torch.cat(features).view(len(prompts), count, -1)
    return F.normalize(features.mean(dim=1), dim=-1)


def class_embeddings(model, tokenizer, classes, templates: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """(C, E) L2-normalised: each class's mean over its normalised template embeddings (`class_prompts`),
    renormalised."""
    return prompt_embeddings(model, tokenizer, class_prompts(classes, templates), batch_size)


@torch.no_grad()
def caption_likelihood_logits(model, tokenizer, images: torch.Tensor, classes, templates: Sequence[str],
                              batch_size: int = 16) -> torch.Tensor:
    """(N, C) generative zero-shot scores: per image and class, the mean over templates of the prompt's summed
    token log-likelihood under the multimodal decoder given the image (bos excluded, eos included). What a
    captioning-only model, which has no contrastive embedding, can be classified with. The unimodal text tower
    does not see the image, so it runs once for all prompts; the decoder runs per (image, prompt) pair,
    `batch_size` images at a time."""
    prompts = class_prompts(classes, templates)
    flat = [p for per_class in prompts for p in per_class]
    device = next(model.parameters()).device
    text = tokenizer.encode(flat).to(device)
    keep = model.text_keep(text)
    _, token_outputs = model.text_stage(text, keep)
    token_outputs = token_outputs[:, :-1]
    targets = text[:, 1:keep]
    real = targets != model.cfg.pad_id
    count = text.shape[0]
    scores = []
    for start in range(0, images.shape[0], batch_size):
        _, caption_tokens = model.image_stage(images[start:start + batch_size].to(device), contrastive=False)
        rows = caption_tokens.shape[0]
        hidden = model.decode(token_outputs.repeat(rows, 1, 1), caption_tokens.repeat_interleave(count, dim=0))
        log_probs = model.caption_head(hidden).float().log_softmax(dim=-1)
        picked = log_probs.gather(-1, targets.repeat(rows, 1)[..., None])[..., 0]
        summed = (picked * real.repeat(rows, 1)).sum(dim=-1)
        scores.append(summed.view(rows, len(prompts), len(templates)).mean(dim=-1).cpu())
    return torch.cat(scores)


def zeroshot_logits(image_features: torch.Tensor, class_features: torch.Tensor) -> torch.Tensor:
    """(N, C) cosine similarities of normalised image embeddings to normalised class embeddings."""
    return image_features.float() @ class_features.float().T


def _classes_above(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the classes other than the label that score at least as high as it (ties go against the label)."""
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits but {labels.shape[0]} labels")
    own = logits.gather(1, labels.long().to(logits.device)[:, None])
    return (logits >= own).sum(dim=1) - 1


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """{k: number of rows whose label is among the k highest logits}; ties go against the label."""
    above = _classes_above(logits, labels)
    return {k: int((above < k).sum()) for k in ks}


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """{k: fraction of rows whose label is among the k highest logits}. Ties go against the label (a
    collapsed model whose logits are all equal scores 0)."""
    above = _classes_above(logits, labels)
    if logits.shape[0] == 0:
        return {k: float("nan") for k in ks}
    return {k: float((above < k).float().mean()) for k in ks}


def attribute_accuracy(logits: torch.Tensor, labels: torch.Tensor, class_attribute: Sequence) -> float:
    """Fraction of rows whose top-1 class has the label's value of one attribute: `class_attribute[c]` is
    class c's value (e.g. its color), so a prediction with the right color and the wrong shape counts for
    color. The top-1 class is the argmax (the first of tied classes)."""
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits but {labels.shape[0]} labels")
    if len(class_attribute) != logits.shape[1]:
        raise ValueError(f"{logits.shape[1]} classes of logits but {len(class_attribute)} attribute values")
    if logits.shape[0] == 0:
        return float("nan")
    predicted = logits.argmax(dim=1).tolist()
    hits = [class_attribute[p] == class_attribute[int(t)] for p, t in zip(predicted, labels.tolist())]
    return sum(hits) / len(hits)
