"""Shard specs -> shard urls: brace patterns, `::`-joined lists, directories, local files and remote urls."""

from __future__ import annotations

import glob
import os
from typing import Sequence

from webdataset.shardlists import expand_urls

SHARD_PATTERNS = ("*.tar", "*.tar.gz", "*.tgz")


def is_remote(url: str) -> bool:
    """A url read through a command or a network scheme (`pipe:...`, `http://`, `s3://`), not a local path."""
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
            if is_remote(url):
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
