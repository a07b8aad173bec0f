"""One data-parallel rank's streams: the deterministic order of its shards and samples, the decoding of each sample
and the packing of batches, each batch tagged with its stream's position. Picklable: each DataLoader worker runs a
stream (megacoca.data.shards.ShardLoader deals them and keeps the positions).

Order (all deterministic for `seed`; `W = num_streams = max(num_workers, 1)`):
- epoch `e`: the shard list is shuffled with (seed, e); rank `r` takes shards `r::dp_size` of that order and
  stream `w` takes `w::W` of the rank's shards. Ranks and streams therefore never overlap, and the union
  over ranks is every shard. In an epoch planned by a re-split (megacoca.data.position), the epoch's pieces
  are the plan's leftovers, dealt the same way.
- within a shard, samples go through a shuffle buffer seeded with (seed, e, shard); it is reset at each
  shard boundary so a position inside a shard is just "how many samples of this shard were emitted".
- each stream packs its own batches (they may span shards and epochs: epochs roll over, every batch is
  full).
- train-time random crops use a numpy Generator seeded with (seed, e, shard, sample index).

Bad samples (undecodable image, empty caption, non-UTF-8 text, missing image or caption) are skipped and
counted by reason in the stream's position; a tar that cannot be read to the end counts as `corrupt_shard` (the
samples before the damage are kept), a remote shard given up after its retries as `failed_shard`, and each
failed attempt at a remote shard as RETRY_COUNT (megacoca.data.shard_reader says how shards are read).
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from typing import Any, Iterator

import numpy as np
import torch

from megacoca.data.position import RETRY_COUNT
from megacoca.data.shard_reader import ShardFailedError, decode_caption, image_bytes, read_shard
from megacoca.data.transforms import load_image

log = logging.getLogger(__name__)


class SourceExhaustedError(RuntimeError):
    """A stream read a whole epoch of its shards and found no valid sample (all corrupt, failed or unlabelled)."""


def _shuffle_buffer(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Reservoir-style shuffle buffer: deterministic for `rng`; `size >= shard length` is a full permutation."""
    if size <= 1:
        yield from samples
        return
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        index = rng.randrange(len(buffer))
        yield buffer[index]
        buffer[index] = sample
    rng.shuffle(buffer)
    yield from buffer


class RankStreams:
    """Everything a loader worker needs (picklable): the deterministic order and the batch packing of one rank's
    streams. `plan` is the re-split plan the loader's position holds (megacoca.data.position)."""

    def __init__(self, urls, batch_size, tokenizer, transform, dp_rank, dp_size, num_streams, seed, shuffle,
                 shuffle_buffer, epochs, with_json, read_options, text_rule=None):
        self.urls = urls
        # how a sample's text is made (megacoca.data.source_text); None: its caption (`decode_caption`)
        self.text_rule = text_rule
        self.read_options = read_options  # read_shard's retries, timeout, retry_delay
        self.batch_size = batch_size
        self.tokenizer = tokenizer
        self.transform = transform
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.num_streams = num_streams
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.epochs = epochs
        self.with_json = with_json
        self.plan: dict[int, list[tuple[int, int]]] = {}  # epoch -> pieces (index in epoch_order, first sample)
        self.draft_size = getattr(transform, "size", None)
        self.transform_takes_rng = bool(getattr(transform, "accepts_rng", False))

    def epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.urls)))
        if self.shuffle:
            random.Random(f"megacoca-shards:{self.seed}:{epoch}").shuffle(order)
        return order

    def epoch_pieces(self, epoch: int) -> list[tuple[int, int]]:
        """(global shard index, first sample) of every reader's pieces in `epoch`, in the order they are dealt:
        the planned leftovers of a re-split epoch, else every shard of the epoch's order from sample 0."""
        order = self.epoch_order(epoch)
        if epoch in self.plan:
            return [(order[k], first) for k, first in self.plan[epoch]]
        return [(shard, 0) for shard in order]

    def stream_pieces(self, epoch: int, stream: int) -> list[tuple[int, int]]:
        """(global shard index, first sample) read by `stream` of this rank in `epoch`."""
        return self.epoch_pieces(epoch)[self.dp_rank :: self.dp_size][stream :: self.num_streams]

    def stream_shards(self, epoch: int, stream: int) -> list[int]:
        """Global shard indices read by `stream` of this rank in `epoch`."""
        return [shard for shard, _ in self.stream_pieces(epoch, stream)]

    def shard_samples(self, epoch: int, shard: int, on_error, on_retry=None) -> Iterator[dict]:
        samples = read_shard(self.urls[shard], on_error=on_error, on_retry=on_retry, **self.read_options)
        if not self.shuffle:
            return samples
        rng = random.Random(f"megacoca-samples:{self.seed}:{epoch}:{shard}")
        return _shuffle_buffer(samples, self.shuffle_buffer, rng)

    def decode(self, raw, epoch, shard, index, skipped: Counter):
        if self.text_rule is None:
            caption, reason = decode_caption(raw)
        else:
            caption, reason = self.text_rule.text(raw, epoch, shard, index)
        data = image_bytes(raw)
        if reason is None and data is None:
            reason = "missing_image"
        if reason is None:
            try:
                image = load_image(data, self.draft_size)
            except Exception as exn:  # any decoder failure: truncated, corrupt, unsupported, bomb
                reason = "corrupt_image"
                if skipped[reason] < 5:
                    log.warning("skipping %s (%s): corrupt image: %s", raw.get("__key__"), raw.get("__url__"), exn)
        if reason is not None:
            skipped[reason] += 1
            return None
        if self.transform_takes_rng:
            rng = np.random.default_rng([self.seed, epoch, shard, index])
            pixels = self.transform(image, rng=rng)
        else:
            pixels = self.transform(image)
        meta = None
        if self.with_json and "json" in raw:
            try:
                meta = json.loads(bytes(raw["json"]).decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                meta = None
        return pixels, caption, raw["__key__"], meta

    def collate(self, items, position) -> dict[str, Any]:
        images = torch.stack([item[0] for item in items]).to(torch.float32)
        captions = [item[1] for item in items]
        batch = {
            "images": images,
            "text": self.tokenizer.encode(captions) if self.tokenizer is not None else None,
            "keys": [item[2] for item in items],
            "captions": captions,
            "_position": position,
        }
        if self.with_json:
            batch["json"] = [item[3] for item in items]
        return batch

    def samples(self, stream: int, start: dict[str, Any], skipped: Counter) -> Iterator[tuple[Any, tuple]]:
        """The decoded samples of one stream from position `start` (epoch, shard, sample), each with the stream's
        position after it, `(epoch, shard index in the stream's pieces, samples of that shard emitted)`. Bad samples
        are counted in `skipped` by reason as they are passed. Ends after `epochs` epochs (never if None); raises
        SourceExhaustedError when a whole (unplanned) epoch of the stream's shards gives no valid sample."""
        epoch, shard_pos, sample_pos = int(start["epoch"]), int(start["shard"]), int(start["sample"])

        def on_error(exn):
            if isinstance(exn, ShardFailedError):
                skipped["failed_shard"] += 1
                log.warning("remote shard skipped: %s", exn)
            else:
                skipped["corrupt_shard"] += 1
                log.warning("corrupt or unreadable shard (rest of it skipped): %s", exn)

        def on_retry(exn):
            skipped[RETRY_COUNT] += 1

        while self.epochs is None or epoch < self.epochs:
            pieces = self.stream_pieces(epoch, stream)
            # a planned (re-split) epoch holds leftovers, possibly none or all bad: it cannot spin forever
            full_epoch, valid = epoch not in self.plan and shard_pos == 0 and sample_pos == 0, 0
            while shard_pos < len(pieces):
                shard, first = pieces[shard_pos]
                sample_pos = max(sample_pos, first)  # a leftover piece starts where its old reader stopped
                for index, raw in enumerate(self.shard_samples(epoch, shard, on_error, on_retry)):
                    if index < sample_pos:  # fast-forward after a resume: no decoding
                        continue
                    sample_pos = index + 1
                    item = self.decode(raw, epoch, shard, index, skipped)
                    if item is None:
                        continue
                    valid += 1
                    yield item, (epoch, shard_pos, sample_pos)
                shard_pos, sample_pos = shard_pos + 1, 0
            if full_epoch and valid == 0:
                raise SourceExhaustedError(
                    f"rank {self.dp_rank} stream {stream}: no valid sample in a whole epoch of shards "
                    f"{[self.urls[i] for i, _ in pieces]}; skipped so far: {dict(skipped)}"
                )
            epoch, shard_pos = epoch + 1, 0

    def batches(self, stream: int, start: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Batches of one stream from position `start` (epoch, shard, sample, skipped)."""
        skipped = Counter({k: int(v) for k, v in start.get("skipped", {}).items()})
        pending = []
        for item, (epoch, shard_pos, sample_pos) in self.samples(stream, start, skipped):
            pending.append(item)
            if len(pending) == self.batch_size:
                position = {"stream": stream, "epoch": epoch, "shard": shard_pos, "sample": sample_pos,
                            "skipped": dict(skipped)}
                yield self.collate(pending, position)
                pending = []
        # finite epochs: a last position-only item, so skips after the last full batch are counted too
        yield {"_position": {"stream": stream, "epoch": self.epochs, "shard": 0, "sample": 0,
                             "skipped": dict(skipped)}}
