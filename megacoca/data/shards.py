"""Webdataset shards (img2dataset layout) -> batches for one data-parallel rank, with an exactly resumable position.

Layout: each sample is `key.jpg|jpeg|png|webp|...` + `key.txt` (+ optional `key.json`) inside `.tar` shards.

Order (all deterministic for `seed`; `W = max(num_workers, 1)` "streams"):
- epoch `e`: the shard list is shuffled with (seed, e); rank `r` takes shards `r::dp_size` of that order and
  stream `w` takes `w::W` of the rank's shards. Ranks and streams therefore never overlap, and the union
  over ranks is every shard. Fewer shards than `dp_size * W` is an error.
- within a shard, samples go through a shuffle buffer seeded with (seed, e, shard); it is reset at each
  shard boundary so a position inside a shard is just "how many samples of this shard were emitted".
- each stream packs its own batches (they may span shards and epochs: epochs roll over, every batch is
  full); the loader takes batches from the streams round-robin (PyTorch's DataLoader order for workers).
- train-time random crops use a numpy Generator seeded with (seed, e, shard, sample index).

Position: each batch carries its stream's position after the batch, (epoch, shard index in the stream's
list, samples of that shard already emitted, counted from the shard's first sample) plus the stream's
cumulative skip counts. The loader keeps the last consumed batch's position per stream and whose turn is
next; `state_dict()` returns them and a new loader with `load_state_dict()` produces exactly the batch that
would have come next (re-reading, without decoding, at most one shard per stream to fast-forward). The state
is per rank: save every rank's.

Re-split for another dp size or worker count (`reshard_states(all old ranks' states, dp_size, num_workers)`,
the batch size may change too): the leftover epochs are those from the slowest old stream's epoch to the
fastest's (and any epoch a previous re-split planned). For each, the new state carries a plan: the pieces in
the epoch's shard order that no old stream consumed, each shard not read to the end by its old reader from
the sample that reader stopped at (0 if it had not started it; shards it had passed are gone), dealt like
shards (new rank `i` takes pieces `i::dp_size`, its stream `w` takes `w::W`; a reader with none moves on).
Every new stream starts at the slowest epoch; the epochs after the leftover ones follow the normal order at
the new size. A piece started at sample k continues the shard's shuffled order, and crops stay seeded by the
sample's index in it. Guaranteed, within each leftover epoch: the new ranks together read exactly the samples
no old rank consumed, each once. "Consumed" is exact because positions are at batch boundaries: a sample is
either in a batch the old loader handed out before `state_dict()` or unread (there is no partial batch; a
batch prefetched but not handed out counts as unread). Earlier epochs were consumed whole by the old ranks.
Not guaranteed: the order of the samples, which rank reads which, and the batches' composition differ from a
run that kept its size (with finite `epochs`, each stream's last partial batch of the last epoch is dropped as
always). The same dp size and worker count gives back the states unchanged (an exact resume).

Bad samples (undecodable image, empty caption, non-UTF-8 text, missing image or caption) are skipped and
counted in `loader.skipped`; a tar that cannot be read to the end counts as `corrupt_shard` (the samples
before the damage are kept). A missing local shard path raises FileNotFoundError when the loader is built.

Remote shards (`pipe:CMD`, `http(s)://` read with curl, other webdataset schemes): a command that exits
non-zero, a connection that fails, or a stream that stays silent for `shard_timeout` seconds (the command is
killed) is a failed attempt; the shard is opened again (`shard_retries` times at most, counted in
`loader.shard_retries`, `retry_delay` x attempt seconds apart) and the samples already emitted are skipped without
decoding, so a shard that succeeds on a retry gives exactly the samples of an undisturbed read. After the last
attempt the rest of the shard is skipped, logged with the url and the error, and counted as `failed_shard`.
The read timeout covers `pipe:` and http(s) streams; a local file on a hung filesystem is the watchdog's.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import io
import json
import logging
import os
import random
import select
import shlex
import signal
import subprocess
import tempfile
import time
from collections import Counter
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_iterator

from megacoca.data.transforms import load_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
CAPTION_EXTENSIONS = ("txt",)
SKIP_REASONS = ("corrupt_image", "empty_caption", "non_utf8_text", "missing_image", "missing_caption", "corrupt_shard",
                "failed_shard")
RETRY_COUNT = "shard_retry"  # failed attempts at remote shards, kept with the skip counts (not a skip reason)
SHARD_RETRIES = 3  # defaults: attempts after the first at a remote shard,
SHARD_TIMEOUT_S = 120.0  # seconds a remote stream may stay silent,
RETRY_DELAY_S = 1.0  # and the pause before retry k (k x this)
SHARD_PATTERNS = ("*.tar", "*.tar.gz", "*.tgz")
STATE_VERSION = 2  # 2: adds the re-split plan (version 1 states load as having none)


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard spec -> list of shard urls.

    A spec is a string or a list of strings; each string may be a brace pattern (`dir/{00000..00009}.tar`),
    several patterns joined by `::`, a directory (its `*.tar`, `*.tar.gz`, `*.tgz`, sorted), a local file,
    or anything webdataset's gopen opens (`http://`, `s3://`, `pipe:...`; not checked here). A local path
    that does not exist raises FileNotFoundError with a one-line message naming it.
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    urls: list[str] = []
    for item in items:
        for url in expand_urls(os.fspath(item)):
            if not url:
                continue
            if _is_remote(url):
                urls.append(url)
                continue
            path = url[len("file:") :] if url.startswith("file:") else url
            if os.path.isdir(path):
                found = sorted({f for pattern in SHARD_PATTERNS for f in glob.glob(os.path.join(path, pattern))})
                if not found:
                    raise FileNotFoundError(f"no shards (*.tar) in directory: {path}")
                urls.extend(found)
            elif os.path.isfile(path):
                urls.append(path)
            else:
                raise FileNotFoundError(f"shard not found: {path}")
    if not urls:
        raise ValueError(f"shard spec {spec!r} names no shards")
    return urls


class ShardFailedError(OSError):
    """A remote shard that failed on every attempt (the message names it and the last error)."""


class _CommandStream(io.RawIOBase):
    """The stdout of a shell command, read with a timeout. No byte for `timeout` seconds: the command (its whole
    process group) is killed and TimeoutError raised. close() raises OSError if the command exited non-zero,
    with the end of its stderr; closed before the command finished (the reader stopped early), it is killed."""

    def __init__(self, command: str, timeout: float | None):
        self.command, self.timeout = command, timeout
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self.stderr,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.fd = self.proc.stdout.fileno()
        self.eof = False

    def __str__(self) -> str:  # webdataset appends "@ <stream>" to a read error's message
        return "its output"

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.timeout is not None:
            ready, _, _ = select.select([self.fd], [], [], self.timeout)
            if not ready:
                self._kill()
                raise TimeoutError(f"no data for {self.timeout:g}s, killed")
        data = os.read(self.fd, len(buffer))
        buffer[: len(data)] = data
        self.eof = self.eof or not data
        return len(data)

    def _kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.closed:
            return
        try:
            if not self.eof:
                self._kill()  # stopped early, or failed: nothing more is wanted from it
            else:
                try:
                    self.proc.wait(timeout=self.timeout)
                except subprocess.TimeoutExpired:
                    self._kill()
                    raise TimeoutError(f"closed its output but did not exit within {self.timeout:g}s, "
                                       "killed") from None
                if self.proc.returncode != 0:
                    self.stderr.seek(0)
                    tail = " ".join(self.stderr.read()[-300:].decode("utf-8", "replace").split())
                    raise OSError(f"exited with status {self.proc.returncode}" + (f": {tail}" if tail else ""))
        finally:
            self.proc.stdout.close()
            self.stderr.close()
            super().close()


def _open_shard(url: str, timeout: float | None):
    """A binary stream of the shard: a local file, a `pipe:` command or curl (with the read timeout), or
    webdataset's gopen for other schemes. A command's stream is unbuffered: tarfile asks for 10 KiB at a time
    and takes the short reads a pipe gives, so a sample is out as soon as its bytes are."""
    if url.startswith("pipe:"):
        return _CommandStream(url[len("pipe:"):], timeout)
    if url.startswith(("http://", "https://")):
        connect = f" --connect-timeout {max(int(timeout), 1)}" if timeout is not None else ""
        return _CommandStream(f"curl -f -s -S -L{connect} {shlex.quote(url)}", timeout)
    return gopen(url, "rb")


def _read_once(url: str, timeout: float | None) -> Iterator[dict[str, Any]]:
    """One attempt at a shard: raw samples until the end, or the first error (raised). A sample is given when
    the next one's first file arrives (webdataset's grouping), the last one only once the stream closed cleanly:
    a stream cut short (a command that then exits non-zero) never gives a sample with some of its files missing."""

    def reraise(exn):
        raise exn

    stream = _open_shard(url, timeout)
    ended, last = [], None
    try:
        def files():
            for item in tar_file_iterator(stream, handler=reraise):
                item["__url__"] = url
                yield item
            ended.append(True)

        for sample in group_by_keys(files(), handler=reraise):
            if ended:
                last = sample  # grouped because the files ran out: complete only if the stream ends cleanly
            else:
                yield sample
    finally:
        stream.close()  # a command that failed raises here, after its output was read
    if last is not None:
        yield last


def read_shard(url: str, on_error: Callable[[Exception], None] | None = None, *, retries: int = SHARD_RETRIES,
               timeout: float | None = SHARD_TIMEOUT_S, retry_delay: float = RETRY_DELAY_S,
               on_retry: Callable[[Exception], None] | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples of one tar shard, in file order: dicts with `__key__`, `__url__` and one bytes value per
    extension (lower-cased). Uses webdataset's tar reading. A local shard's first read error ends it. A remote
    shard's failed attempt (see the module doc) is passed to `on_retry` and the shard read again, skipping the
    samples already given, `retries` times at most; then the rest is given up as a ShardFailedError. The error
    that ends a shard is passed to `on_error` (re-raised if None)."""
    attempts = retries + 1 if _is_remote(url) else 1
    emitted = 0
    for attempt in range(1, attempts + 1):
        try:
            for index, sample in enumerate(_read_once(url, timeout)):
                if index >= emitted:  # a retry passes over what an earlier attempt gave
                    emitted += 1
                    yield sample
            return
        except Exception as exn:  # truncated / unreadable tar, failed command, timeout
            error = exn
        if attempt < attempts:
            log.warning("shard %s: attempt %d of %d failed (%s); retrying", url, attempt, attempts, error)
            if on_retry is not None:
                on_retry(error)
            time.sleep(retry_delay * attempt)
    if attempts > 1:
        error = ShardFailedError(f"{url}: failed {attempts} times, rest of the shard skipped after {emitted} "
                                 f"samples; last error: {' '.join(str(error).split())}")
    if on_error is None:
        raise error
    on_error(error)


def iter_samples(spec, on_error: Callable[[Exception], None] | None = None, **read_options) -> Iterator[dict[str, Any]]:
    """All raw samples of a shard spec in order (no shuffle, no decode): for tokenizer training, eval, tools.
    `read_options`: read_shard's retries, timeout, retry_delay."""
    for url in expand_shards(spec):
        yield from read_shard(url, on_error=on_error, **read_options)


def decode_caption(raw: dict[str, Any]) -> tuple[str | None, str | None]:
    """(caption, None) or (None, skip reason) for a raw sample."""
    data = next((raw[ext] for ext in CAPTION_EXTENSIONS if ext in raw), None)
    if data is None:
        return None, "missing_caption"
    if isinstance(data, str):
        text = data
    else:
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            return None, "non_utf8_text"
    text = text.strip()
    if not text:
        return None, "empty_caption"
    return text, None


def image_bytes(raw: dict[str, Any]) -> bytes | None:
    return next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)


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


class _Streams:
    """Everything a loader worker needs (picklable): the deterministic order and the batch packing."""

    def __init__(self, urls, batch_size, tokenizer, transform, dp_rank, dp_size, num_streams, seed, shuffle,
                 shuffle_buffer, epochs, with_json, read_options):
        self.urls = urls
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
        caption, reason = decode_caption(raw)
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

    def batches(self, stream: int, start: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Batches of one stream from position `start` (epoch, shard, sample, skipped)."""
        epoch, shard_pos, sample_pos = int(start["epoch"]), int(start["shard"]), int(start["sample"])
        skipped = Counter({k: int(v) for k, v in start.get("skipped", {}).items()})

        def on_error(exn):
            if isinstance(exn, ShardFailedError):
                skipped["failed_shard"] += 1
                log.warning("remote shard skipped: %s", exn)
            else:
                skipped["corrupt_shard"] += 1
                log.warning("corrupt or unreadable shard (rest of it skipped): %s", exn)

        def on_retry(exn):
            skipped[RETRY_COUNT] += 1

        pending = []
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
                    pending.append(item)
                    if len(pending) == self.batch_size:
                        position = {"stream": stream, "epoch": epoch, "shard": shard_pos, "sample": sample_pos,
                                    "skipped": dict(skipped)}
                        yield self.collate(pending, position)
                        pending = []
                shard_pos, sample_pos = shard_pos + 1, 0
            if full_epoch and valid == 0:
                raise RuntimeError(
                    f"rank {self.dp_rank} stream {stream}: no valid sample in a whole epoch of shards "
                    f"{[self.urls[i] for i, _ in pieces]}; skipped so far: {dict(skipped)}"
                )
            epoch, shard_pos = epoch + 1, 0
        # finite epochs: a last position-only item, so skips after the last full batch are counted too
        yield {"_position": {"stream": stream, "epoch": epoch, "shard": 0, "sample": 0, "skipped": dict(skipped)}}


class _WorkerDataset(torch.utils.data.IterableDataset):
    """Runs one stream per DataLoader worker. Worker j plays stream (j + turn) % W so that the DataLoader's
    round-robin, which always starts at worker 0, starts at the stream whose turn it is."""

    def __init__(self, streams: _Streams, positions: list[dict], turn: int):
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
            seconds a stream may stay silent (None: forever), pause before retry k (k x this); see the module doc.
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
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size): got dp_rank={dp_rank}, dp_size={dp_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if transform is None:
            raise ValueError("ShardLoader needs an image transform (e.g. megacoca.data.transforms.ImageTransform)")
        if shard_retries < 0:
            raise ValueError(f"shard_retries must be >= 0, got {shard_retries}")
        if shard_timeout is not None and not shard_timeout > 0:
            raise ValueError(f"shard_timeout must be > 0 seconds (or None), got {shard_timeout}")
        self.urls = expand_shards(shards)
        self.num_workers = int(num_workers)
        num_streams = max(self.num_workers, 1)
        if len(self.urls) < dp_size * num_streams:
            raise ValueError(
                f"{len(self.urls)} shards cannot feed dp_size={dp_size} x num_workers={num_streams} "
                f"(= {dp_size * num_streams} readers, each needs >= 1 shard): write more, smaller shards "
                "or use fewer workers"
            )
        self._streams = _Streams(self.urls, int(batch_size), tokenizer, transform, int(dp_rank), int(dp_size),
                                 num_streams, int(seed), bool(shuffle), int(shuffle_buffer), epochs, with_json,
                                 {"retries": int(shard_retries), "timeout": shard_timeout,
                                  "retry_delay": float(retry_delay)})
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self.multiprocessing_context = multiprocessing_context
        self._reset_position()

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
        total = Counter({reason: 0 for reason in SKIP_REASONS})
        for position in self._positions:
            total.update(position["skipped"])
        return {reason: total[reason] for reason in SKIP_REASONS}

    @property
    def shard_retries(self) -> int:
        """Retries of remote shards so far (failed attempts that were followed by another)."""
        return sum(position["skipped"].get(RETRY_COUNT, 0) for position in self._positions)

    @property
    def epoch(self) -> int:
        """The epoch the slowest stream is in."""
        return min(position["epoch"] for position in self._positions)

    @property
    def batches_consumed(self) -> int:
        return self._batches

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
    def _reset_position(self):
        self._positions = [{"epoch": 0, "shard": 0, "sample": 0, "skipped": {}} for _ in range(self.num_streams)]
        self._turn = 0
        self._batches = 0
        self._streams.plan = {}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Batches from the current position on; with finite `epochs`, iterating a finished loader starts
        a new pass from the beginning."""
        epochs = self._streams.epochs
        if epochs is not None and all(p["epoch"] >= epochs for p in self._positions):
            self._reset_position()
        positions = [dict(p) for p in self._positions]
        if self.num_workers == 0:
            source = self._streams.batches(0, positions[0])
        else:
            dataset = _WorkerDataset(self._streams, positions, self._turn)
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
            self._positions[stream] = position
            if "images" not in batch:  # end-of-stream marker (finite epochs): position only
                continue
            self._turn = (stream + 1) % self.num_streams
            self._batches += 1
            yield batch

    # ---- resumable position -----------------------------------------------------------------------
    def _fingerprint(self) -> str:
        names = "\n".join(os.path.basename(url.rstrip("/")) for url in self.urls)
        return hashlib.sha1(names.encode()).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        """The position after the last consumed batch (plain ints/strs/dicts: torch.save or json). `plan` is
        the re-split plan this loader was given (`reshard_states`; `{}` if none): `{str(epoch): [[k, first
        sample], ...]}`, `k` indexing the epoch's shard order, the same on every rank."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "num_workers": self.num_workers,
            "num_shards": len(self.urls),
            "shards_fingerprint": self._fingerprint(),
            "batch_size": self.batch_size,
            "batches": self._batches,
            "turn": self._turn,
            "streams": [
                {"epoch": p["epoch"], "shard": p["shard"], "sample": p["sample"], "skipped": dict(p["skipped"])}
                for p in self._positions
            ],
            "plan": _plan_to_state(self._streams.plan),
        }

    def load_resplit_state(self, states: Sequence[dict[str, Any]]) -> None:
        """Continue from the states of every data-parallel rank of a run with another dp size or num_workers
        (`states[r]`: old dp rank r's `state_dict()`), re-split for this loader by `reshard_states`."""
        self.load_state_dict(reshard_states(states, self.dp_size, self.num_workers)[self.dp_rank])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (from `state_dict()` of a loader with the same shards, seed, dp_rank,
        dp_size and num_workers, or from `reshard_states` for this dp size and num_workers; the batch size
        may differ: positions count samples). Version 1 states (no plan) are accepted."""
        if state.get("version") not in (1, STATE_VERSION):
            raise ValueError(f"unsupported data-loader state version {state.get('version')!r} "
                             f"(expected 1 or {STATE_VERSION})")
        expected = {
            "seed": self.seed,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "num_workers": self.num_workers,
            "num_shards": len(self.urls),
            "shards_fingerprint": self._fingerprint(),
        }
        wrong = [f"{name}: saved {state.get(name)!r}, now {value!r}" for name, value in expected.items()
                 if state.get(name) != value]
        if wrong:
            raise ValueError("data-loader state does not match this loader (exact resume needs the same "
                             "shards, seed, dp rank/size and num_workers): " + "; ".join(wrong))
        streams = state["streams"]
        if len(streams) != self.num_streams:
            raise ValueError(f"data-loader state has {len(streams)} streams, this loader {self.num_streams}")
        self._positions = [
            {"epoch": int(s["epoch"]), "shard": int(s["shard"]), "sample": int(s["sample"]),
             "skipped": {k: int(v) for k, v in s.get("skipped", {}).items()}}
            for s in streams
        ]
        self._turn = int(state["turn"]) % self.num_streams
        self._batches = int(state.get("batches", 0))
        self._streams.plan = _parse_plan(state.get("plan", {}), len(self.urls))


def _parse_plan(plan: dict, num_shards: int) -> dict[int, list[tuple[int, int]]]:
    """A state's plan (str or int epoch keys, [k, first sample] pieces) -> {epoch: [(k, first), ...]}."""
    try:
        parsed = {int(epoch): [(int(k), int(first)) for k, first in pieces] for epoch, pieces in plan.items()}
    except (AttributeError, TypeError, ValueError):
        raise ValueError("data-loader state has a malformed re-split plan (want {epoch: [[k, sample], ...]})") from None
    for epoch, pieces in parsed.items():
        bad = [piece for piece in pieces if not (0 <= piece[0] < num_shards and piece[1] >= 0)]
        if epoch < 0 or bad or len({k for k, _ in pieces}) != len(pieces):
            raise ValueError(f"data-loader state's re-split plan for epoch {epoch} does not fit {num_shards} "
                             "shards (or repeats one)")
    return parsed


def _plan_to_state(plan: dict[int, list[tuple[int, int]]]) -> dict[str, list[list[int]]]:
    return {str(epoch): [[k, first] for k, first in plan[epoch]] for epoch in sorted(plan)}


def reshard_states(states: Sequence[dict[str, Any]], dp_size: int, num_workers: int) -> list[dict[str, Any]]:
    """Each new dp rank's loader state for a run resumed with `dp_size` ranks of `num_workers` workers, from
    `states[r]` = `ShardLoader.state_dict()` of old dp rank r (every old rank, in rank order).

    The result's element i loads into `ShardLoader(same shards and seed, dp_rank=i, dp_size=dp_size,
    num_workers=num_workers)`; within the leftover epochs the new ranks read every sample the old ones had
    not consumed exactly once (the module doc's "Re-split" says what is and is not guaranteed). States that
    carry a plan (re-split before) are re-split with it honoured. Skip counts are summed onto new rank 0's
    first stream, so totals over the ranks are kept; `batches` of every new rank starts at the largest old
    rank's count and counts on. The same dp size and num_workers gives back copies of the states (version 2).
    A bad input (no states, a state of an unknown version, states of different runs, a missing or misplaced
    rank) raises ValueError with a line naming the problem.
    """
    if not states:
        raise ValueError("reshard_states needs the data-loader state of every old dp rank, got none")
    if dp_size < 1 or num_workers < 0:
        raise ValueError(f"reshard_states needs dp_size >= 1 and num_workers >= 0, got {dp_size} and {num_workers}")
    for rank, state in enumerate(states):
        version = state.get("version") if isinstance(state, dict) else None
        if version not in (1, STATE_VERSION):
            raise ValueError(f"states[{rank}]: unsupported data-loader state version {version!r} "
                             f"(expected 1 or {STATE_VERSION})")
    first = states[0]
    num_shards = int(first["num_shards"])
    plans = [_parse_plan(state.get("plan", {}), num_shards) for state in states]
    for rank, state in enumerate(states):
        for name in ("seed", "shards_fingerprint", "num_shards", "dp_size", "num_workers"):
            if state.get(name) != first.get(name):
                raise ValueError(f"data-loader states of different runs: {name} is {first.get(name)!r} in "
                                 f"states[0], {state.get(name)!r} in states[{rank}]")
        if plans[rank] != plans[0]:
            raise ValueError(f"data-loader states of different runs: states[0] and states[{rank}] have "
                             "different re-split plans")
    old_dp, old_workers = int(first["dp_size"]), int(first["num_workers"])
    old_streams = max(old_workers, 1)
    if len(states) != old_dp:
        raise ValueError(f"got {len(states)} data-loader states for dp_size={old_dp}: pass every old dp rank's, "
                         "in rank order")
    for rank, state in enumerate(states):
        if state.get("dp_rank") != rank:
            raise ValueError(f"states[{rank}] is dp rank {state.get('dp_rank')!r}'s: pass every old dp rank's "
                             "state once, in rank order")
        if len(state["streams"]) != old_streams:
            raise ValueError(f"states[{rank}] has {len(state['streams'])} streams, num_workers={old_workers} "
                             f"makes {old_streams}")
    new_streams = max(num_workers, 1)
    if num_shards < dp_size * new_streams:
        raise ValueError(f"{num_shards} shards cannot feed dp_size={dp_size} x num_workers={new_streams} "
                         f"(= {dp_size * new_streams} readers, each needs >= 1 shard)")
    if dp_size == old_dp and num_workers == old_workers:
        return [dict(copy.deepcopy(state), version=STATE_VERSION, plan=_plan_to_state(plans[0]))
                for state in states]

    # item j of an epoch's pieces belongs to old rank j % D, its stream (j // D) % W, at index j // (D W)
    positions = [[(int(p["epoch"]), int(p["shard"]), int(p["sample"])) for p in state["streams"]]
                 for state in states]
    epochs = [position[0] for rank in positions for position in rank]
    slowest = min(epochs)
    whole = [(k, 0) for k in range(num_shards)]
    plan = {}
    for epoch in range(slowest, max(epochs + list(plans[0])) + 1):
        leftover = []
        for j, (k, start) in enumerate(plans[0].get(epoch, whole)):
            reached, index, sample = positions[j % old_dp][j // old_dp % old_streams]
            at = j // (old_dp * old_streams)
            if reached > epoch or (reached == epoch and at < index):
                continue  # its old reader passed it
            if reached == epoch and at == index:
                start = max(start, sample)  # its old reader stopped inside it
            leftover.append((k, start))
        if leftover != whole:  # an untouched epoch is just the normal order at the new size
            plan[epoch] = leftover

    skipped: Counter = Counter()
    for state in states:
        for stream in state["streams"]:
            skipped.update({reason: int(count) for reason, count in stream.get("skipped", {}).items()})
    return [
        {
            "version": STATE_VERSION,
            "seed": first["seed"],
            "dp_rank": rank,
            "dp_size": dp_size,
            "num_workers": num_workers,
            "num_shards": num_shards,
            "shards_fingerprint": first["shards_fingerprint"],
            "batch_size": first.get("batch_size"),
            "batches": max(int(state.get("batches", 0)) for state in states),
            "turn": 0,
            "streams": [{"epoch": slowest, "shard": 0, "sample": 0,
                         "skipped": dict(skipped) if rank == stream == 0 else {}} for stream in range(new_streams)],
            "plan": _plan_to_state(plan),
        }
        for rank in range(dp_size)
    ]
