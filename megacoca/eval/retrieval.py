"""Image<->text retrieval recall@k from L2-normalised embeddings.

A query counts as a hit at k when one of its positives ranks in the top k. The positives of image i are the
texts whose caption string equals caption i (its own caption included), and symmetrically for text queries,
so duplicated captions (common in synthetic data) are not scored as misses. Ties are scored against the
query: a negative with the same score as the best positive ranks above it, so a collapsed model that gives
every item the same embedding gets recall 0, not 1.
"""

from __future__ import annotations

from typing import Sequence

import torch

DEFAULT_KS = (1, 5, 10)


def caption_positives(captions: Sequence[str]) -> torch.Tensor:
    """(N, N) bool: [i, j] is True when caption i and caption j are the same string."""
    ids: dict[str, int] = {}
    groups = torch.tensor([ids.setdefault(c, len(ids)) for c in captions], dtype=torch.long)
    return groups[:, None] == groups[None, :]


def best_positive_rank(similarity: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """(Q,) long: how many negatives score >= the best-scoring positive of each query (0 = first).

    similarity (Q, N) float; positives (Q, N) bool with at least one True per row.
    """
    if similarity.shape != positives.shape:
        raise ValueError(f"similarity {tuple(similarity.shape)} and positives {tuple(positives.shape)} differ")
    if not bool(positives.any(dim=1).all()):
        raise ValueError("every query needs at least one positive")
    similarity = similarity.float()
    best = similarity.masked_fill(~positives, float("-inf")).amax(dim=1, keepdim=True)
    return ((similarity >= best) & ~positives).sum(dim=1)


def recall_at_k(similarity: torch.Tensor, positives: torch.Tensor, ks: Sequence[int] = DEFAULT_KS,
                chunk: int = 1024) -> dict[int, float]:
    """{k: fraction of queries with a positive in the top k}, computed `chunk` query rows at a time."""
    ranks = torch.cat([
        best_positive_rank(similarity[start:start + chunk], positives[start:start + chunk])
        for start in range(0, similarity.shape[0], chunk)
    ]) if similarity.shape[0] else torch.zeros(0, dtype=torch.long)
    if ranks.numel() == 0:
        return {k: float("nan") for k in ks}
    return {k: float((ranks < k).float().mean()) for k in ks}


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, captions: Sequence[str] | None = None,
                      ks: Sequence[int] = DEFAULT_KS, groups: Sequence | None = None, prefix: str = "") -> dict[str, float]:
    """`{prefix}i2t_r{k}` and `{prefix}t2i_r{k}` for paired (N, E) image and text embeddings.

    Pair i (image i, caption i) is the ground truth; with `captions`, identical caption strings are positives
    of each other too. Without them only the pair's own index is positive. With `groups` (a label per pair),
    every pair of the same group is a positive instead (class-level retrieval).
    """
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f"{image_features.shape[0]} images but {text_features.shape[0]} texts")
    n = image_features.shape[0]
    if groups is not None:
        if len(groups) != n:
            raise ValueError(f"{len(groups)} groups for {n} pairs")
        positives = caption_positives([repr(g) for g in groups])
    elif captions is not None:
        if len(captions) != n:
            raise ValueError(f"{len(captions)} captions for {n} pairs")
        positives = caption_positives(captions)
    else:
        positives = torch.eye(n, dtype=torch.bool)
    similarity = image_features.float() @ text_features.float().T
    i2t = recall_at_k(similarity, positives, ks)
    t2i = recall_at_k(similarity.T, positives.T, ks)
    out = {f"{prefix}i2t_r{k}": v for k, v in i2t.items()}
    out.update({f"{prefix}t2i_r{k}": v for k, v in t2i.items()})
    return out
