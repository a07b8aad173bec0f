"""Which source each sample slot of a data mixture comes from: a deterministic, low-discrepancy interleaving.

The slots of a run are numbered globally: data-parallel rank r's j-th batch of B samples at dp size D holds slots
`base + j*D*B + r*B + [0, B)` (megacoca.data.mixture), so a global batch is a window of D*B consecutive slots and
each rank's batch a window of B. Slot n goes to source s when `u(n) = (n * PHI64 + offset) mod 2**64` falls in
s's interval of [0, 2**64), the intervals laid end to end in the sources' order with lengths proportional to their
weights. `n * PHI64 mod 2**64` is the golden-ratio Weyl sequence: by the three-distance theorem any window of N
consecutive slots gives each source N x its share of them within a few samples (the error grows like log N, not
like sqrt(N) as independent draws would), so the proportions hold in every batch and every window of batches,
not only on average. The offset comes from the seed; everything is integer arithmetic (numpy uint64, which wraps
mod 2**64), so every machine computes the same assignment.

Compared with the anchors: Megatron's BlendedDataset picks the source whose count lags its share most (a
sequential scan kept as an index file); open_clip resamples shards with replacement (`--train-data-upsampling-
factors`, not resumable). Here the assignment is a closed form of the slot number, so a resume, a re-split or a
worker needs nothing but the slot count.
"""

from __future__ import annotations

import random
from fractions import Fraction
from typing import Sequence

import numpy as np

PHI64 = 0x9E3779B97F4A7C15  # round(2**64 / golden ratio), odd: the Fibonacci-hashing multiplier
_TWO64 = 1 << 64


def mixture_offset(seed: int) -> int:
    """The Weyl sequence's starting point for `seed` (a 64-bit integer)."""
    return random.Random(f"megacoca-mixture:{int(seed)}").getrandbits(64)


def thresholds(weights: Sequence[float]) -> np.ndarray:
    """The upper ends of the sources' intervals of [0, 2**64) but the last's, as uint64 (exact: the weights are
    taken as the binary fractions they are). A weight of 0 gives an empty interval (a dropped source)."""
    exact = [Fraction(float(w)) for w in weights]
    total = sum(exact)
    if not total > 0:
        raise ValueError("a mixture needs at least one source with a weight > 0")
    ends, running = [], Fraction(0)
    for weight in exact[:-1]:
        running += weight
        ends.append(min(int(running * _TWO64 / total), _TWO64 - 1))
    return np.array(ends, dtype=np.uint64)


def slot_sources(first_slot: int, count: int, ends: np.ndarray, offset: int) -> np.ndarray:
    """The source index (int64) of each of the `count` slots from `first_slot` on."""
    slots = np.arange(count, dtype=np.uint64) + np.uint64(first_slot % _TWO64)
    with np.errstate(over="ignore"):
        u = slots * np.uint64(PHI64) + np.uint64(offset)
    return np.searchsorted(ends, u, side="right").astype(np.int64)


def shares(weights: Sequence[float]) -> list[float]:
    """Each source's share of the samples (its weight over the sum)."""
    total = float(sum(weights))
    return [float(w) / total for w in weights]
