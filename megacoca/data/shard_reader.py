"""Raw samples of webdataset shards (img2dataset layout): reading a shard, local or remote, and a sample's fields.

Layout: each sample is `key.jpg|jpeg|png|webp|...` + `key.txt` (+ optional `key.json`) inside `.tar` shards. A raw
sample is a dict with `__key__`, `__url__` and one bytes value per extension (lower-cased); `decode_caption` and
`image_bytes` take its caption and image out (the loader decodes them: megacoca.data.streams).

A local tar that cannot be read to the end gives the samples before the damage, then its error. Remote shards
(`pipe:CMD`, `http(s)://` read with curl, other webdataset schemes): a command that exits non-zero, a connection
that fails, or a stream that stays silent for `timeout` seconds (the command is killed) is a failed attempt; the
shard is opened again (`retries` times at most, each failed attempt passed to `on_retry`, `retry_delay` x attempt
seconds apart) and the samples already given are passed over, so a shard that succeeds on a retry gives exactly
the samples of an undisturbed read. After the last attempt the rest of the shard is given up as a
ShardFailedError naming the url and the last error. The read timeout covers `pipe:` and http(s) streams; a local
file on a hung filesystem is the watchdog's.
"""

from __future__ import annotations

import io
import logging
import os
import select
import shlex
import signal
import subprocess
import tempfile
import time
from typing import Any, Callable, Iterator

from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_iterator

from megacoca.data.shard_urls import expand_shards, is_remote

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
CAPTION_EXTENSIONS = ("txt",)
SHARD_RETRIES = 3  # defaults: attempts after the first at a remote shard,
SHARD_TIMEOUT_S = 120.0  # seconds a remote stream may stay silent,
RETRY_DELAY_S = 1.0  # and the pause before retry k (k x this)


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
    attempts = retries + 1 if is_remote(url) else 1
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
    """The bytes of a raw sample's image (the first of IMAGE_EXTENSIONS it has), or None."""
    return next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
