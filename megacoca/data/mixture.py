"""A weighted mixture of shard sources -> batches for one data-parallel rank, exactly resumable and re-splittable.

`MixtureLoader` reads `data.sources` (megacoca.config.sources): every source is read exactly as a one-source
`ShardLoader` reads its shards (megacoca.data.streams: its own epochs, shard order, shuffle, skips and, after a
re-split, its own plan; one stream per DataLoader worker), and each sample slot of a batch is given to a source by
the deterministic interleaving of megacoca.data.mixture_schedule (the slot's global number and the weights: the
proportions hold within every batch and window of batches). A source that runs out starts its next epoch while
the others go on. The position (megacoca.data.mixture_position) holds every source's position, so a resume is
exact, and a resume at another data-parallel size re-splits every source as a single source is re-split.

A source none of whose samples can be read in a whole epoch (every shard corrupt, failed or unlabelled) ends the
run naming it, or with `on_source_failure="drop"` is dropped (logged; the other sources' weights renormalised for
the slots that would have gone to it, on the streams that found it dead).

`MixtureMirror` is the mixture's PositionMirror (megacoca.data.mirror): the position of a rank that reads nothing.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Iterator, NoReturn, Sequence

import torch

from megacoca.data.mixture_position import MixturePosition
from megacoca.data.mixture_schedule import mixture_offset, slot_sources, thresholds
from megacoca.data.position import check_loader_args
from megacoca.data.shard_reader import RETRY_DELAY_S, SHARD_RETRIES, SHARD_TIMEOUT_S
from megacoca.data.shard_urls import expand_shards
from megacoca.data.streams import RankStreams, SourceExhaustedError

log = logging.getLogger(__name__)


class MixtureStreams:
    """Everything a loader worker needs (picklable): each source's RankStreams and the slot assignment."""

    def __init__(self, streams: dict[str, RankStreams], weights: dict[str, float], seed: int, on_failure: str):
        self.streams = streams
        self.names = list(streams)
        self.weights = [weights[name] for name in self.names]
        self.offset = mixture_offset(seed)
        self.on_failure = on_failure
        first = streams[self.names[0]]
        self.batch_size, self.dp_rank, self.dp_size = first.batch_size, first.dp_rank, first.dp_size
        self.num_streams = first.num_streams

    def batches(self, stream: int, starts: dict[str, dict], dead: set[str], first_batch: int,
                slot_base: int) -> Iterator[dict[str, Any]]:
        """Batches of stream `stream`: its `first_batch`-th batch since `slot_base` (the global slots consumed at
        the position it starts from), then every `num_streams`-th. `starts[name]`: the source's stream position."""
        skipped = {name: Counter({k: int(v) for k, v in starts[name].get("skipped", {}).items()})
                   for name in self.names}
        at = {name: (int(starts[name]["epoch"]), int(starts[name]["shard"]), int(starts[name]["sample"]))
              for name in self.names}
        samples = {name: self.streams[name].samples(stream, starts[name], skipped[name])
                   for name in self.names if name not in dead}
        live = [name not in dead for name in self.names]
        batch = first_batch
        while True:
            first = slot_base + batch * self.dp_size * self.batch_size + self.dp_rank * self.batch_size
            items, counts, died = self._fill(stream, first, samples, live, at)
            tag = {"stream": stream, "counts": dict(counts), "dead": died,
                   "sources": {name: {"epoch": at[name][0], "shard": at[name][1], "sample": at[name][2],
                                      "skipped": dict(skipped[name])} for name in self.names}}
            out = self.streams[self.names[0]].collate([item for item, _ in items], tag)
            out["sources"] = [name for _, name in items]
            yield out
            batch += self.num_streams

    def _fill(self, stream: int, first: int, samples: dict, live: list[bool], at: dict):
        """One batch's (item, source name) pairs for the slots from `first`, the samples taken from each source,
        and the sources that died while it was filled."""
        owners = self._owners(first, self.batch_size, live)
        items, counts, died = [], Counter(), []
        slot = 0
        while slot < self.batch_size:
            name = self.names[owners[slot]]
            try:
                item, at[name] = next(samples[name])
            except SourceExhaustedError as error:
                died.append(self._drop(name, stream, error, live))
                owners[slot:] = self._owners(first + slot, self.batch_size - slot, live)
                continue
            items.append((item, name))
            counts[name] += 1
            slot += 1
        return items, counts, died

    def _owners(self, first: int, count: int, live: list[bool]):
        weights = [w if alive else 0.0 for w, alive in zip(self.weights, live)]
        return slot_sources(first, count, thresholds(weights), self.offset)

    def _drop(self, name: str, stream: int, error: Exception, live: list[bool]) -> str:
        if self.on_failure != "drop":
            raise SourceExhaustedError(f"data source {name!r}: {error} (data.on_source_failure=drop goes on "
                                       "without it)") from None
        live[self.names.index(name)] = False
        if not any(live):
            raise SourceExhaustedError(f"every data source failed; the last, {name!r}: {error}") from None
        log.warning("data source %r dropped on rank %d stream %d (data.on_source_failure=drop): %s", name,
                    self.dp_rank, stream, error)
        return name


class _WorkerDataset(torch.utils.data.IterableDataset):
    """One mixture stream per DataLoader worker; worker j plays stream (j + turn) % W (as ShardLoader's)."""

    def __init__(self, streams: MixtureStreams, starts: list[dict], dead: list[set], turn: int, slot_base: int):
        self.streams, self.starts, self.dead, self.turn, self.slot_base = streams, starts, dead, turn, slot_base

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        stream = (worker + self.turn) % self.streams.num_streams
        return self.streams.batches(stream, self.starts[stream], self.dead[stream], worker, self.slot_base)


def expand_sources(sources) -> dict[str, list[str]]:
    """{name: shard urls} of `SourceConfig`s (FileNotFoundError / ValueError naming the source)."""
    urls = {}
    for source in sources:
        try:
            urls[source.name] = expand_shards(source.shards)
        except (FileNotFoundError, ValueError) as error:
            raise type(error)(f"source {source.name!r}: {error}") from None
    return urls


class MixtureLoader:
    """Batches `{"images", "text", "keys", "captions", "sources"}` (`sources`: each sample's source name) of a
    mixture, for one data-parallel rank (module doc). `sources`: `SourceConfig`s; `text_rules[name]`: how that
    source's text is made (megacoca.data.source_text); the other arguments as ShardLoader's (endless: no
    `epochs`)."""

    def __init__(self, sources, text_rules: dict, batch_size: int, tokenizer=None, transform=None,
                 dp_rank: int = 0, dp_size: int = 1, num_workers: int = 0, seed: int = 0, *,
                 on_source_failure: str = "stop", shuffle_buffer: int = 1000, prefetch_factor: int = 2,
                 multiprocessing_context=None, shard_retries: int = SHARD_RETRIES,
                 shard_timeout: float | None = SHARD_TIMEOUT_S, retry_delay: float = RETRY_DELAY_S):
        check_loader_args(batch_size, dp_rank, dp_size, num_workers, seed)
        if transform is None:
            raise ValueError("MixtureLoader needs an image transform (e.g. megacoca.data.transforms.ImageTransform)")
        if not sources:
            raise ValueError("a mixture needs at least one source")
        self.urls = expand_sources(sources)
        weights = {source.name: float(source.weight) for source in sources}
        self.num_workers = int(num_workers)
        self._position = MixturePosition(self.urls, weights, batch_size, dp_rank, dp_size, num_workers, seed)
        read = {"retries": int(shard_retries), "timeout": shard_timeout, "retry_delay": float(retry_delay)}
        streams = {name: RankStreams(self.urls[name], int(batch_size), tokenizer, transform, int(dp_rank),
                                     int(dp_size), self._position.num_streams, int(seed), True, int(shuffle_buffer),
                                     None, False, read, text_rule=text_rules.get(name))
                   for name in self.urls}
        self._streams = MixtureStreams(streams, weights, int(seed), on_source_failure)
        self.prefetch_factor = prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self.changes: list[str] = []  # what the last resume changed in the mixture (lines for the log)

    batch_size = property(lambda self: self._position.batch_size)
    dp_rank = property(lambda self: self._position.dp_rank)
    dp_size = property(lambda self: self._position.dp_size)
    names = property(lambda self: list(self._position.names))

    @property
    def skipped(self) -> dict[str, int]:
        """Bad samples skipped so far by reason, summed over the sources."""
        return self._position.skipped()

    @property
    def batches_consumed(self) -> int:
        return self._position.batches

    def describe(self) -> str:
        """One line for the log: every source's share and shards, and what happens when one fails."""
        total = sum(self._streams.weights)
        parts = [f"{name} {100 * weight / total:.1f}% ({len(self.urls[name])} shards)"
                 for name, weight in zip(self._streams.names, self._streams.weights)]
        return (f"data: a mixture of {len(parts)} sources: " + ", ".join(parts)
                + f"; a source that fails: {self._streams.on_failure} (data.on_source_failure)")

    def accounting(self) -> dict[str, dict[str, int]]:
        """Per source: the `samples` this rank took from it, the `epochs` it completed, the samples it `skipped`."""
        return self._position.accounting()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        position = self._position
        starts = [{name: dict(position.sources[name].streams[w]) for name in position.names}
                  for w in range(position.num_streams)]
        dead = [{name for name in position.names if w in position.dead[name]} for w in range(position.num_streams)]
        if self.num_workers == 0:
            source = self._streams.batches(0, starts[0], dead[0], 0, position.slots)
        else:
            dataset = _WorkerDataset(self._streams, starts, dead, position.turn, position.slots)
            source = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                                 prefetch_factor=self.prefetch_factor, persistent_workers=False,
                                                 multiprocessing_context=self.multiprocessing_context)
        for batch in source:
            tag = batch.pop("_position")
            self._position.record(tag["stream"], tag)
            for name in tag["dead"]:
                log.warning("data source %r: dropped on dp rank %d, stream %d", name, self.dp_rank, tag["stream"])
            yield batch

    def _sync_plans(self) -> None:
        for name in self._position.names:
            self._streams.streams[name].plan = self._position.sources[name].plan

    def state_dict(self) -> dict[str, Any]:
        return self._position.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from this rank's saved state (megacoca.data.mixture_position says what may change)."""
        self.changes = self._position.load_state_dict(state)
        self._sync_plans()
        for line in self.changes:
            log.warning(line)

    def load_resplit_state(self, states: Sequence[dict[str, Any]]) -> None:
        """Continue from the states of every dp rank of a run with another dp size or worker count."""
        self.changes = self._position.load_resplit_state(states)
        self._sync_plans()
        for line in self.changes:
            log.warning(line)


class MixtureMirror:
    """The mixture position of a rank that reads nothing (megacoca.data.mirror.PositionMirror's counterpart):
    `mirror(state)` takes the reading rank's; iterating it raises TypeError."""

    def __init__(self, sources, batch_size: int, dp_rank: int = 0, dp_size: int = 1, num_workers: int = 0,
                 seed: int = 0):
        check_loader_args(batch_size, dp_rank, dp_size, num_workers, seed)
        urls = expand_sources(sources)
        weights = {source.name: float(source.weight) for source in sources}
        self._position = MixturePosition(urls, weights, batch_size, dp_rank, dp_size, num_workers, seed)

    dp_rank = property(lambda self: self._position.dp_rank)
    names = property(lambda self: list(self._position.names))

    @property
    def skipped(self) -> dict[str, int]:
        return {}

    def accounting(self) -> dict[str, dict[str, int]]:
        """Zeros for every source: the reading rank counts (the same keys, so collectives over them match)."""
        return {name: {"samples": 0, "epochs": 0, "skipped": 0} for name in self._position.names}

    def __iter__(self) -> NoReturn:
        raise TypeError(f"MixtureMirror (dp rank {self.dp_rank}) reads no data and yields no batch")

    def mirror(self, state: dict[str, Any]) -> None:
        self._position.load_state_dict(state)

    def state_dict(self) -> dict[str, Any]:
        return self._position.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._position.load_state_dict(state)

    def load_resplit_state(self, states: Sequence[dict[str, Any]]) -> None:
        self._position.load_resplit_state(states)
