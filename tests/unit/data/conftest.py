"""Shared helpers for the data tests: tiny shards written in milliseconds, and a picklable stub tokenizer."""

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from webdataset import TarWriter


class StubTokenizer:
    """Picklable: one id per character (bos 1, eos 2, pad 0), enough to check the text tensor."""

    context_length = 16
    vocab_size = 260
    pad_id, bos_id, eos_id = 0, 1, 2

    def encode(self, texts):
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.bos_id] + [3 + (ord(c) % 250) for c in text][: self.context_length - 2] + [self.eos_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out


def jpeg_bytes(value: int, size: int = 12) -> bytes:
    image = np.full((size, size, 3), value % 256, np.uint8)
    image[0, 0] = (value * 7 % 256, value * 13 % 256, 0)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_shards(directory, num_shards: int, per_shard, prefix: str = "s"):
    """num_shards tars of valid samples (per_shard: int or list of ints); keys are globally unique."""
    os.makedirs(directory, exist_ok=True)
    counts = per_shard if isinstance(per_shard, (list, tuple)) else [per_shard] * num_shards
    paths, keys, index = [], [], 0
    for shard, count in enumerate(counts):
        path = os.path.join(str(directory), f"{shard:05d}.tar")
        with TarWriter(path, mtime=0) as writer:
            for _ in range(count):
                key = f"{prefix}{index:06d}"
                writer.write({"__key__": key, "jpg": jpeg_bytes(index), "txt": f"caption {index}".encode(),
                              "json": json.dumps({"i": index}).encode()})
                keys.append(key)
                index += 1
        paths.append(path)
    return paths, keys


@pytest.fixture
def stub_tokenizer():
    return StubTokenizer()
