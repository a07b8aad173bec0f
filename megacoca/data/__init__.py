"""Data: webdataset shards with an exactly resumable position, image transforms, tokenizers, synth-shapes.

Public API (docs/design.md, "Data contract"):
- `ShardLoader`, `expand_shards`, `iter_samples` (megacoca.data.shards)
- `ImageTransform`, `image_transform`, `load_image`, `CLIP_MEAN`, `CLIP_STD` (megacoca.data.transforms)
- `Tokenizer` (SentencePiece), `ClipBpeTokenizer`, `load_tokenizer`, `train_sentencepiece`
  (megacoca.data.tokenizer)
- `megacoca.data.shapes`: `CLASSES`, `class_prompts`, `caption_matches`, `synth_shapes`
"""

from megacoca.data.shards import SKIP_REASONS, ShardLoader, expand_shards, iter_samples
from megacoca.data.tokenizer import ClipBpeTokenizer, Tokenizer, TokenizerLike, load_tokenizer, train_sentencepiece
from megacoca.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform, image_transform, load_image

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ClipBpeTokenizer",
    "ImageTransform",
    "SKIP_REASONS",
    "ShardLoader",
    "Tokenizer",
    "TokenizerLike",
    "expand_shards",
    "image_transform",
    "iter_samples",
    "load_image",
    "load_tokenizer",
    "train_sentencepiece",
]
