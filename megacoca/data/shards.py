"""Webdataset shards (img2dataset layout) -> batches for one data-parallel rank, with an exactly resumable position.

`ShardLoader` is the reading loader: its streams (megacoca.data.streams: the deterministic order, decoding, skips
and batch packing; one stream per DataLoader worker) read raw samples (megacoca.data.shard_reader: local and
remote shards, retries) and the loader takes batches from the streams round-robin (PyTorch's DataLoader order for
workers), advancing its position (megacoca.data.position: the saved state and its re-split, `reshard_states`).
A rank that needs no batch keeps the same position without reading (megacoca.data.mirror.PositionMirror).

The shard pipeline's public names are importable from here: `ShardLoader`, `expand_shards`, `iter_samples`,
`read_shard`, `decode_caption`, `image_bytes`, `reshard_states`, `SKIP_REASONS`, `IMAGE_EXTENSIONS` (and the
rest of `__all__`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch

from megacoca.data.position import (
    RETRY_COUNT,
    SKIP_REASONS,
    STATE_VERSION,
    LoaderPosition,
    check_loader_args,
    reshard_states,
)
from megacoca.data.shard_reader import (
    CAPTION_EXTENSIONS,
    IMAGE_EXTENSIONS,
    RETRY_DELAY_S,
    SHARD_RETRIES,
    SHARD_TIMEOUT_S,
    ShardFailedError,
    decode_caption,
    image_bytes,
    iter_samples,
    read_shard,
)
from megacoca.data.shard_urls import SHARD_PATTERNS, expand_shards, is_remote
from megacoca.data.streams import RankStreams

__all__ = [
    "CAPTION_EXTENSIONS", "IMAGE_EXTENSIONS", "RETRY_COUNT", "RETRY_DELAY_S", "SHARD_PATTERNS", "SHARD_RETRIES",
    "SHARD_TIMEOUT_S", "SKIP_REASONS", "STATE_VERSION", "ShardFailedError", "ShardLoader", "decode_caption",
    "expand_shards", "image_bytes", "is_remote", "iter_samples", "read_shard", "reshard_states",
]


class _WorkerDataset(torch.utils.data.IterableDataset):
    """Runs one stream per DataLoader worker. Worker j plays stream (j + turn) % W so that the DataLoader's
    round-robin, which always starts at worker 0, starts at the stream whose turn it is."""

    def __init__(self, streams: RankStreams, positions: list[dict], turn: int):
        self.streams = streams
        self.positions = positions
        self.turn = turn

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        stream = (worker + self.turn) % self.streams.num_streams
        return self.streams.batches(stream, self.positions[stream])


class ShardLoader:
    """Batches `{"images": float32 (B,3,H,W), "text": long (B,L), "keys": list[str], "captions": list[str]}`
    (plus `"json"`: list of dict|None with `with_json=True`) for one data-parallel rank.

    Args:
        shards: shard spec (see `expand_shards`); missing local paths raise FileNotFoundError here.
        batch_size: per-rank batch size; every batch is full (the stream rolls over into the next epoch).
        tokenizer: anything with `encode(list[str]) -> LongTensor` (see megacoca.data.tokenizer); None
            leaves `"text"` as None (captions are still in `"captions"`).
        transform: PIL RGB image -> float tensor (3,H,W); called with `rng=` if it has `accepts_rng = True`
            (megacoca.data.transforms.ImageTransform does).
        dp_rank, dp_size: this rank and the data-parallel size.
        num_workers: DataLoader worker processes (0 = in this process). Part of the order: resume with the
            same value, or re-split the states with `reshard_states`.
        seed: drives shard order, in-shard shuffle and train-time crops.
        shuffle: False reads shards and samples in the given order (eval).
        shuffle_buffer: in-shard shuffle buffer (samples); >= samples per shard means a full permutation.
        epochs: None = endless (epochs roll over); N = stop after N epochs (each stream's last partial
            batch is dropped).
        shard_retries, shard_timeout, retry_delay: remote shards (`pipe:`, URLs): attempts after a failed one,
            seconds a stream may stay silent (None: forever), pause before retry k (k x this); see
            megacoca.data.shard_reader.
    """

    def __init__(
        self,
        shards,
        batch_size: int,
        tokenizer=None,
        transform: Callable | None = None,
        dp_rank: int = 0,
        dp_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        *,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        epochs: int | None = None,
        with_json: bool = False,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        multiprocessing_context=None,
        shard_retries: int = SHARD_RETRIES,
        shard_timeout: float | None = SHARD_TIMEOUT_S,
        retry_delay: float = RETRY_DELAY_S,
    ):
        check_loader_args(batch_size, dp_rank, dp_size, num_workers, seed)
        if transform is None:
            raise ValueError("ShardLoader needs an image transform (e.g. megacoca.data.transforms.ImageTransform)")
        if shard_retries < 0:
            raise ValueError(f"shard_retries must be >= 0, got {shard_retries}")
        if shard_timeout is not None and not shard_timeout > 0:
            raise ValueError(f"shard_timeout must be > 0 seconds (or None), got {shard_timeout}")
        self.urls = expand_shards(shards)
        self.num_workers = int(num_workers)
        self._position = LoaderPosition(self.urls, batch_size, dp_rank, dp_size, num_workers, seed)
        self._streams = RankStreams(self.urls, int(batch_size), tokenizer, transform, int(dp_rank), int(dp_size),
                                    self._position.num_streams, int(seed), bool(shuffle), int(shuffle_buffer),
                                    epochs, with_json, {"retries": int(shard_retries), "timeout": shard_timeout,
                                                        "retry_delay": float(retry_delay)})
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self.multiprocessing_context = multiprocessing_context

    # ---- read-only views --------------------------------------------------------------------------
    batch_size = property(lambda self: self._streams.batch_size)
    dp_rank = property(lambda self: self._streams.dp_rank)
    dp_size = property(lambda self: self._streams.dp_size)
    seed = property(lambda self: self._streams.seed)
    tokenizer = property(lambda self: self._streams.tokenizer)
    transform = property(lambda self: self._streams.transform)
    num_streams = property(lambda self: self._streams.num_streams)

    @property
    def skipped(self) -> dict[str, int]:
        """Bad samples skipped so far, by reason (summed over this rank's streams, up to the last batch);
        `corrupt_shard` and `failed_shard` count shards."""
        return self._position.skipped

    @property
    def shard_retries(self) -> int:
        """Retries of remote shards so far (failed attempts that were followed by another)."""
        return self._position.shard_retries

    @property
    def epoch(self) -> int:
        """The epoch the slowest stream is in."""
        return self._position.epoch

    @property
    def batches_consumed(self) -> int:
        return self._position.batches

    def _rank_pieces(self, epoch: int) -> list[tuple[int, int]]:
        return self._streams.epoch_pieces(epoch)[self.dp_rank :: self.dp_size]

    def rank_shards(self, epoch: int) -> list[str]:
        """The shard urls this rank reads in `epoch` (in an epoch planned by a re-split, some from a later
        sample on: see `reshard_states`)."""
        return [self.urls[shard] for shard, _ in self._rank_pieces(epoch)]

    def samples_per_epoch(self, epoch: int = 0) -> int:
        """Samples (valid or not) this rank reads in `epoch`; reads every tar header of its shards."""
        total = 0
        for shard, first in self._rank_pieces(epoch):
            count = sum(1 for _ in read_shard(self.urls[shard], on_error=lambda exn: None,
                                              **self._streams.read_options))
            total += max(count - first, 0)
        return total

    # ---- iteration --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Batches from the current position on; with finite `epochs`, iterating a finished loader starts
        a new pass from the beginning."""
        epochs = self._streams.epochs
        if epochs is not None and all(p["epoch"] >= epochs for p in self._position.streams):
            self._position.reset()
            self._streams.plan = self._position.plan
        positions = [dict(p) for p in self._position.streams]
        if self.num_workers == 0:
            source = self._streams.batches(0, positions[0])
        else:
            dataset = _WorkerDataset(self._streams, positions, self._position.turn)
            source = torch.utils.data.DataLoader(
                dataset,
                batch_size=None,
                num_workers=self.num_workers,
                prefetch_factor=self.prefetch_factor,
                pin_memory=self.pin_memory,
                persistent_workers=False,
                multiprocessing_context=self.multiprocessing_context,
            )
        for batch in source:
            position = batch.pop("_position")
            stream = position.pop("stream")
            given = "images" in batch  # else an end-of-stream marker (finite epochs): position only
            self._position.record(stream, position, batch=given)
            if given:
                yield batch

    # ---- resumable position (megacoca.data.position) ----------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The position after the last consumed batch (plain ints/strs/dicts: torch.save or json). `plan` is
        the re-split plan this loader was given (`reshard_states`; `{}` if none): `{str(epoch): [[k, first
        sample], ...]}`, `k` indexing the epoch's shard order, the same on every rank."""
        return self._position.state_dict()

    def load_resplit_state(self, states: Sequence[dict[str, Any]]) -> None:
        """Continue from the states of every data-parallel rank of a run with another dp size or num_workers
        (`states[r]`: old dp rank r's `state_dict()`), re-split for this loader by `reshard_states`."""
        self._position.load_resplit_state(states)
        self._streams.plan = self._position.plan

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (from `state_dict()` of a loader with the same shards, seed, dp_rank,
        dp_size and num_workers, or from `reshard_states` for this dp size and num_workers; the batch size
        may differ: positions count samples). Version 1 states (no plan) are accepted."""
        self._position.load_state_dict(state)
        self._streams.plan = self._position.plan
