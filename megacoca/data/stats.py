"""Sizes of a data mixture's sources and what one epoch of each costs (`megacoca data stats`).

A source's samples are counted from its tar headers alone (a local shard's file data is seeked over, not read): the
regular files grouped by key as webdataset groups them (`base_plus_ext`: the name up to the first dot of its
basename, consecutive files of one key being one sample). A sample the loader would skip (no image, a bad label)
still counts. A remote shard (`pipe:`, http) is read through, as the loader reads it.

With sources of N_i samples and weights w_i, source i has the share p_i = w_i / sum(w) of the mixture's samples
(megacoca.data.mixture_schedule), so it completes one epoch after N_i / p_i mixture samples, while source j has
then read N_i p_j / (N_j p_i) of its epochs. The largest N_i / p_i is one epoch of every source.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass, field

from webdataset.tariterators import base_plus_ext

from megacoca.data.shard_reader import read_shard
from megacoca.data.shard_urls import expand_shards, is_remote

SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: `__x__` members are no sample's files


def count_samples(url: str) -> int:
    """The samples of one shard (module doc). OSError / tarfile.TarError for a local file that is not a tar."""
    if is_remote(url):
        return sum(1 for _ in read_shard(url))
    path = url.removeprefix("file:")
    count, current = 0, None
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isreg() or SKIP_META.match(member.name):
                continue
            key, _ = base_plus_ext(member.name)
            if key is not None and key != current:
                count, current = count + 1, key
    return count


@dataclass
class SourceSize:
    """One source of a mixture: its name, weight, shard urls and sample count per shard."""

    name: str
    weight: float
    urls: list[str]
    per_shard: list[int] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(self.per_shard)


def source_size(name: str, spec: str, weight: float) -> SourceSize:
    """The SourceSize of a shard spec (its shards counted)."""
    urls = expand_shards(spec)
    return SourceSize(name, weight, urls, [count_samples(url) for url in urls])


@dataclass
class EpochRow:
    """What one epoch of source `name` costs: `mixture_samples` drawn in all, and every source's epochs then."""

    name: str
    share: float
    mixture_samples: float
    epochs: dict[str, float]


def mixture_epochs(sizes: list[SourceSize]) -> list[EpochRow]:
    """One EpochRow per source (module doc); ValueError naming a source without samples or with a weight <= 0."""
    for size in sizes:
        if size.samples == 0:
            raise ValueError(f"source {size.name!r} has no samples in its {len(size.urls)} shards")
        if not size.weight > 0:
            raise ValueError(f"source {size.name!r} has weight {size.weight}: it must be > 0")
    total = sum(size.weight for size in sizes)
    shares = {size.name: size.weight / total for size in sizes}
    rows = []
    for size in sizes:
        drawn = size.samples / shares[size.name]
        rows.append(EpochRow(size.name, shares[size.name], drawn,
                             {other.name: drawn * shares[other.name] / other.samples for other in sizes}))
    return rows
