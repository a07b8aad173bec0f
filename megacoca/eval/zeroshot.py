"""Zero-shot classification: class embeddings from prompt templates, averaged, scored against images."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F


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


@torch.no_grad()
def class_embeddings(model, tokenizer, classes, templates: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """(C, E) L2-normalised: each class's mean over its normalised template embeddings, renormalised."""
    prompts = class_prompts(classes, templates)
    flat = [p for per_class in prompts for p in per_class]
    device = next(model.parameters()).device
    features = []
    for start in range(0, len(flat), batch_size):
        text = tokenizer.encode(flat[start:start + batch_size]).to(device)
        features.append(model.encode_text(text, normalize=True).float().cpu())
    features = torch.cat(features).view(len(prompts), len(templates), -1)
    return F.normalize(features.mean(dim=1), dim=-1)


def zeroshot_logits(image_features: torch.Tensor, class_features: torch.Tensor) -> torch.Tensor:
    """(N, C) cosine similarities of normalised image embeddings to normalised class embeddings."""
    return image_features.float() @ class_features.float().T


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """{k: fraction of rows whose label is among the k highest logits}. Ties go against the label (a
    collapsed model whose logits are all equal scores 0)."""
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits but {labels.shape[0]} labels")
    if logits.shape[0] == 0:
        return {k: float("nan") for k in ks}
    labels = labels.long().to(logits.device)
    own = logits.gather(1, labels[:, None])
    others = (logits >= own).sum(dim=1) - 1  # classes other than the label that score at least as high
    return {k: float((others < k).float().mean()) for k in ks}


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
