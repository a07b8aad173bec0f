"""A folder of images plus captions -> webdataset shards in the img2dataset layout.

Captions come from a CSV or JSONL file (columns/keys `file` or `image` for the image path, relative to the
images folder or absolute, and `caption` or `text`), or from sidecar `.txt` files next to each image
(`cat.jpg` + `cat.txt`). Image bytes are copied unchanged (no re-encode); each sample gets `key.<ext>`,
`key.txt` and `key.json` (`{"file": <original path relative to the folder>}`). Images without a caption
and captions without an image are skipped and counted; the loader later skips undecodable images.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections import Counter
from typing import Iterator

from webdataset import TarWriter

from megacoca.data.shard_reader import IMAGE_EXTENSIONS

FILE_COLUMNS = ("file", "image", "filename", "path")
CAPTION_COLUMNS = ("caption", "text")


def _column(row: dict, names, what: str, where: str) -> str:
    for name in names:
        if name in row and row[name] is not None:
            return str(row[name])
    raise ValueError(f"{where}: no {what} column (expected one of {', '.join(names)}; got {', '.join(row)})")


def read_caption_file(path: str) -> Iterator[tuple[str, str]]:
    """(image path, caption) rows of a .csv or .jsonl file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"captions file not found: {path}")
    lower = path.lower()
    if lower.endswith(".csv") or lower.endswith(".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if lower.endswith(".tsv") else ",")
            for number, row in enumerate(reader, start=2):
                where = f"{path}:{number}"
                yield _column(row, FILE_COLUMNS, "image", where), _column(row, CAPTION_COLUMNS, "caption", where)
    elif lower.endswith(".jsonl") or lower.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                row = json.loads(line)
                where = f"{path}:{number}"
                yield _column(row, FILE_COLUMNS, "image", where), _column(row, CAPTION_COLUMNS, "caption", where)
    else:
        raise ValueError(f"captions file must be .csv, .tsv or .jsonl: {path}")


def list_images(images_dir: str) -> list[str]:
    """Image files under images_dir (recursive, sorted), relative to it."""
    found = []
    for root, _, files in os.walk(images_dir):
        for name in files:
            if name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
                found.append(os.path.relpath(os.path.join(root, name), images_dir))
    return sorted(found)


_NON_UTF8 = object()  # sentinel caption for a sidecar that is not UTF-8


def sidecar_pairs(images_dir: str) -> Iterator[tuple[str, str | None]]:
    for rel in list_images(images_dir):
        txt = os.path.join(images_dir, os.path.splitext(rel)[0] + ".txt")
        if os.path.isfile(txt):
            with open(txt, "rb") as f:
                data = f.read()
            try:
                yield rel, data.decode("utf-8").strip()
            except UnicodeDecodeError:
                yield rel, _NON_UTF8
        else:
            yield rel, None


def folder_to_shards(images_dir: str, out_dir: str, captions: str | None = None, sidecar: bool = False,
                     shard_size: int = 10000, prefix: str = "", shuffle: bool = True, seed: int = 0) -> dict:
    """Write out_dir/{prefix}{00000..}.tar; returns counts {"written", "shards", "skipped": {...}}.

    `shuffle` (default) writes the samples in a seeded random order: folders are often sorted by class,
    and the loader only shuffles within a shard, so shards should already be mixed."""
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"images folder not found: {images_dir}")
    if (captions is None) == (not sidecar):
        raise ValueError("give exactly one of a captions file (.csv/.jsonl) or sidecar=True")
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    os.makedirs(out_dir, exist_ok=True)
    pairs = list(sidecar_pairs(images_dir) if sidecar else read_caption_file(captions))
    if shuffle:
        random.Random(seed).shuffle(pairs)
    skipped: Counter = Counter()
    written, shard, writer, writer_count, paths = 0, 0, None, 0, []
    try:
        for rel, caption in pairs:
            path = rel if os.path.isabs(rel) else os.path.join(images_dir, rel)
            ext = path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""
            if caption is None:
                skipped["missing_caption"] += 1
                continue
            if caption is _NON_UTF8:
                skipped["non_utf8_text"] += 1
                continue
            if not caption.strip():
                skipped["empty_caption"] += 1
                continue
            if ext not in IMAGE_EXTENSIONS:
                skipped["not_an_image"] += 1
                continue
            if not os.path.isfile(path):
                skipped["missing_image"] += 1
                continue
            if writer is None or writer_count == shard_size:
                if writer is not None:
                    writer.close()
                paths.append(os.path.join(out_dir, f"{prefix}{shard:05d}.tar"))
                writer, writer_count, shard = TarWriter(paths[-1], mtime=0), 0, shard + 1
            with open(path, "rb") as f:
                data = f.read()
            writer.write({
                "__key__": f"{written:09d}",
                "jpg" if ext == "jpeg" else ext: data,
                "txt": caption.strip().encode("utf-8"),
                "json": json.dumps({"file": os.path.relpath(path, images_dir)}).encode("utf-8"),
            })
            written += 1
            writer_count += 1
    finally:
        if writer is not None:
            writer.close()
    return {"written": written, "shards": paths, "skipped": dict(skipped)}
