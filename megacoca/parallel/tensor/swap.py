"""The swap plan: which layers of a built single-device CoCa become which tensor-parallel layers, and the check that
a degree splits the model evenly.

`apply_tensor_parallel` replaces, in place and keeping every parameter name, each Attention with a
TensorParallelAttention, each MLP's fc1 / fc2 with a Column / RowParallelLinear (GELU on the shard between),
the token embedding with a VocabParallelEmbedding and the caption head with a VocabParallelCaptionHead (tied to
the embedding's shard when the flavor ties them). Everything else (LayerNorms, positional/class/CLS
embeddings, pooler queries, the patch embedding, the two contrastive projections, the logit scale) is
replicated: its inputs and the gradients reaching it are identical on every rank of a tensor-parallel group
(the mappings make them so), so its gradients are identical too and no extra reduction is needed: the replicas
stay bit-equal (tested).

`set_tensor_parallel_group` hands a part of the model (the unimodal text tower, when it runs concurrently with the
image tower: megacoca.parallel.overlap) another communicator over the same ranks, for its forward and backward
collectives alike (the mappings' backward uses the group its forward was called with).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from megacoca.models.coca.layers import MLP, Attention
from megacoca.parallel.tensor.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallelAttention,
    VocabParallelCaptionHead,
    VocabParallelEmbedding,
)


def check_tensor_parallel(cfg, tp: int) -> None:
    """One-line ValueError naming the layer and the numbers when `tp` cannot split the model evenly (before any
    process group exists). The vocabulary need not divide: it is padded."""
    splits = [
        ("vision attention", "vision_heads", cfg.vision_heads),
        ("text and multimodal decoder attention", "text_heads", cfg.text_heads),
        ("attentional pooler", "pooler_heads", cfg.pooler_heads),
        ("vision MLP", "vision_mlp_dim", cfg.vision_mlp_dim),
        ("text and multimodal decoder MLP", "text_mlp_dim", cfg.text_mlp_dim),
    ]
    for layer, field, value in splits:
        if value % tp:
            raise ValueError(f"parallel.tp={tp} cannot split the {layer}: {field}={value} is not divisible by {tp}")


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_tensor_parallel(model, dims) -> None:
    """Swap every shardable layer of a built CoCa (materialised or on the meta device) for its tensor-parallel
    shard over `dims.tp_group`, in place. Parameter names do not change."""
    group, rank, size = dims.tp_group, dims.tp_rank, dims.tp_size
    for name, module in list(model.named_modules()):
        if isinstance(module, TensorParallelAttention):
            raise RuntimeError("apply_tensor_parallel: the model is already tensor-parallel")
        if isinstance(module, Attention):
            _replace(model, name, TensorParallelAttention.from_dense(module, group, rank, size))
        elif isinstance(module, MLP):
            module.fc1 = ColumnParallelLinear.from_dense(module.fc1, group, rank, size)
            module.fc2 = RowParallelLinear.from_dense(module.fc2, group, rank, size)
    embedding = VocabParallelEmbedding.from_dense(model.text.embed.token_embedding, group, rank, size)
    model.text.embed.token_embedding = embedding
    tied = embedding.weight if model.cfg.tie_word_embeddings else None
    model.caption_head = VocabParallelCaptionHead.from_dense(model.caption_head, group, rank, size, tied)


TENSOR_PARALLEL_LAYERS = (ColumnParallelLinear, RowParallelLinear, TensorParallelAttention, VocabParallelEmbedding,
                          VocabParallelCaptionHead)


def set_tensor_parallel_group(module: nn.Module, group) -> int:
    """Make every tensor-parallel layer in `module` issue its collectives on `group` (a process group over the same
    ranks as the one it was built with, in the same order); returns how many layers now use it."""
    layers = [m for m in module.modules() if isinstance(m, TENSOR_PARALLEL_LAYERS)]
    for layer in layers:
        layer.group = group
    return len(layers)


def is_tensor_parallel(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))
