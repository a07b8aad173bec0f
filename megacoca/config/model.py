"""CoCaConfig: every shape and layout switch of the CoCa model, and nothing about training."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

PoolerLayout = Literal["paper", "open_clip"]
# Keys that older model configs (config.json, checkpoints) carry and that no longer shape the model:
# activation checkpointing is a training setting now (JobConfig.parallel, applied by megacoca.parallel.parallelize).
RETIRED_KEYS = ("activation_checkpointing",)
KernelChoice = Literal["auto", "triton", "torch"]


@dataclass
class CoCaConfig:
    # Image encoder (ViT).
    image_size: int = 288
    patch_size: int = 18
    in_channels: int = 3
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp_dim: int = 3072
    vision_class_token: bool = False  # open_clip's ViT prepends a class token; the paper's does not
    vision_patch_bias: bool = False  # open_clip's conv1 has no bias
    vision_ln_pre: bool = True  # LayerNorm on the embedded patches before the blocks

    # Attentional poolers over the image tokens.
    pooler_layout: PoolerLayout = "paper"
    caption_queries: int = 256  # paper: queries of the captioning pooler; open_clip: all queries (incl. 0)
    pooler_heads: int = 12
    pooler_dim: int | None = None  # width of the pooled tokens; None -> text_width
    # paper layout: the contrastive pooler reads the caption pooler's outputs (True, the cascade) or the image tokens
    # like the caption pooler (False: two independent poolers, as the paper's Figure 2 pseudocode writes them)
    pooler_cascade: bool = True
    pooler_query_std: float = 0.02  # initial std of the poolers' learned queries (LayerNormed before use)

    # Unimodal text decoder.
    vocab_size: int = 64000
    context_length: int = 64  # text tokens, CLS excluded
    text_width: int = 768
    text_heads: int = 12
    text_mlp_dim: int = 3072
    text_layers: int = 12  # n_uni
    pad_id: int = 0
    legacy_cls_mask: bool = False  # open_clip's shifted CLS pad mask (correct_cls_mask=False)
    text_tokens_after_ln: bool = True  # open_clip sends the decoder the token outputs before ln_final
    # Training forward: drop the batch's trailing all-pad positions (rounded up to a multiple of 8) from the
    # text and decoder stages. Exact: no kept position attends to them and their targets are ignored. Costs
    # one host sync per step; turn off where shapes must stay static (CUDA graphs, pipeline stages).
    trim_text_padding: bool = True

    # Multimodal decoder.
    decoder_layers: int = 12  # n_multi
    decoder_mlp_after_self_attn: bool = False  # open_clip: self-attn block and cross-attn block each own an MLP
    decoder_bias: bool = False  # bias on the vocabulary head
    tie_word_embeddings: bool = False  # vocabulary head shares the token embedding (the paper's giant model)

    # Shared.
    embed_dim: int = 768  # contrastive embedding size
    ln_eps: float = 1e-5
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100.0)
    kernels: KernelChoice = "auto"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def image_tokens(self) -> int:
        return self.num_patches + int(self.vision_class_token)

    @property
    def pooled_width(self) -> int:
        return self.pooler_dim or self.text_width

    def validate(self) -> None:
        def fail(message: str) -> None:
            raise ValueError(f"CoCaConfig: {message}")

        # Sizes first: every check below divides by some of them.
        for name in ("image_size", "patch_size", "in_channels", "vision_width", "vision_layers", "vision_heads",
                     "vision_mlp_dim", "caption_queries", "pooler_heads", "vocab_size", "text_width", "text_heads",
                     "text_mlp_dim", "text_layers", "decoder_layers", "embed_dim"):
            if getattr(self, name) < 1:
                fail(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.context_length < 2:
            fail(f"context_length must be >= 2 (bos + eos), got {self.context_length}")
        if self.pooler_dim is not None and self.pooler_dim < 1:
            fail(f"pooler_dim must be >= 1 or null (text_width), got {self.pooler_dim}")
        if self.patch_size > self.image_size:
            fail(f"patch_size {self.patch_size} is larger than image_size {self.image_size}")
        if not (math.isfinite(self.ln_eps) and self.ln_eps > 0):
            fail(f"ln_eps must be > 0, got {self.ln_eps}")
        for name in ("init_logit_scale", "max_logit_scale"):
            if not math.isfinite(getattr(self, name)):
                fail(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            fail(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for name in ("vision", "text"):
            width, heads = getattr(self, f"{name}_width"), getattr(self, f"{name}_heads")
            if width % heads:
                fail(f"{name}_width {width} is not divisible by {name}_heads {heads}")
        if self.pooled_width % self.pooler_heads:
            fail(f"pooler width {self.pooled_width} is not divisible by pooler_heads {self.pooler_heads}")
        if self.pooler_layout not in ("paper", "open_clip"):
            fail(f"pooler_layout must be 'paper' or 'open_clip', got {self.pooler_layout!r}")
        if self.pooler_layout == "open_clip" and not self.pooler_cascade:
            fail("pooler_cascade=false is a variant of the paper layout (open_clip has one pooler)")
        if not (math.isfinite(self.pooler_query_std) and self.pooler_query_std > 0):
            fail(f"pooler_query_std must be > 0, got {self.pooler_query_std}")
        if self.pooler_layout == "open_clip" and self.caption_queries < 2:
            fail("the open_clip pooler layout needs at least 2 queries (query 0 is the contrastive one)")
        if self.kernels not in ("auto", "triton", "torch"):
            fail(f"kernels must be 'auto', 'triton' or 'torch', got {self.kernels!r}")
        if not 0 <= self.pad_id < self.vocab_size:
            fail(f"pad_id {self.pad_id} is outside the vocabulary of {self.vocab_size}")

    def replace(self, **changes) -> "CoCaConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "CoCaConfig":
        values = {k: v for k, v in values.items() if k not in RETIRED_KEYS}
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"CoCaConfig: unknown keys {unknown}")
        return cls(**values)
