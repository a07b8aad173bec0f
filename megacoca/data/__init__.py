"""Data: webdataset shards with an exactly resumable position, image transforms, tokenizers, synth-shapes.

Public API (docs/design.md, "Data contract"):
- `ShardLoader` (megacoca.data.shards, which also re-exports the names below from their modules), `expand_shards`
  (shard_urls), `iter_samples` (shard_reader), `reshard_states`, `SKIP_REASONS` (position)
- `PositionMirror` (megacoca.data.mirror): the loader of a rank that reads nothing but keeps the data position;
  `build_train_loader` (megacoca.data.loaders): the training run's loader for one rank
- `ImageTransform`, `image_transform`, `load_image`, `CLIP_MEAN`, `CLIP_STD` (megacoca.data.transforms)
- `Tokenizer` (SentencePiece), `ClipBpeTokenizer`, `TokenizerLike`, `load_tokenizer`, `train_sentencepiece`
  (megacoca.data.tokenizer)
- `megacoca.data.shapes`: `CLASSES`, `class_prompts`, `caption_matches`, `synth_shapes`

Names are imported lazily so that importing megacoca.data stays fast (the shard modules import torch).
"""

import importlib

_EXPORTS = {
    "ShardLoader": "shards",
    "PositionMirror": "mirror",
    "build_train_loader": "loaders",
    "reshard_states": "position",
    "expand_shards": "shard_urls",
    "iter_samples": "shard_reader",
    "SKIP_REASONS": "position",
    "ImageTransform": "transforms",
    "image_transform": "transforms",
    "load_image": "transforms",
    "CLIP_MEAN": "transforms",
    "CLIP_STD": "transforms",
    "Tokenizer": "tokenizer",
    "ClipBpeTokenizer": "tokenizer",
    "TokenizerLike": "tokenizer",
    "load_tokenizer": "tokenizer",
    "train_sentencepiece": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"megacoca.data.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'megacoca.data' has no attribute {name!r}")
