"""Parallelize a built single-device CoCa, in a fixed order (torchtitan's `parallelize_llama` is the model):

1. tensor parallelism: swap attention, MLP, pooler, vocabulary and caption-head layers for their
   tensor-parallel shards (megacoca.parallel.tensor), when dims.tp_size > 1;
2. activation checkpointing: each transformer block (ViT blocks, unimodal text blocks, multimodal decoder
   layers) recomputes its activations in backward;
3. without a pipeline, where the layout's overlap choice says so (megacoca.parallel.overlap.choose_overlap): the
   text tower concurrent with the image tower, on a CUDA side stream or in a second thread, its tensor-parallel
   collectives on the communicator of their own (`dims.text_tp_group`);
then, under pipeline parallelism, this rank's stage is cut out of the model (megacoca.parallel.pipeline.stage),
and the Trainer hands the model (or stage) to DeepSpeed (ZeRO sharding over the data-parallel group). The model code
knows none of this: everything is applied from outside, by module swaps and forward wrappers that keep every
parameter's name, so checkpoints and conversions see the single-device names.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from megacoca.parallel.dims import ParallelDims
from megacoca.parallel.overlap import apply_text_overlap
from megacoca.parallel.pipeline.split import check_pipeline
from megacoca.parallel.tensor import apply_tensor_parallel, check_tensor_parallel


def check_layout(cfg, layout, pipeline_split: list[int] | None = None) -> None:
    """Whether the model of `cfg` splits into `layout` (a Layout or ParallelDims: its tp and pp, and its
    micro-batches per step when it says): the tensor degree divides the heads and MLP widths, the pipeline has
    ViT blocks and micro-batches enough for its stages, `pipeline_split` places every block. ValueError (one line)
    otherwise. The command line calls it once per launch, before any process group exists."""
    if layout.pp > 1:
        check_pipeline(cfg, layout.pp, getattr(layout, "grad_accum", None), pipeline_split)
    if layout.tp > 1:
        check_tensor_parallel(cfg, layout.tp)


def parallelize(model: torch.nn.Module, dims: ParallelDims, *, activation_checkpointing: bool = False,
                overlap_text_tower: str = "off"):
    """Apply the steps above to `model` in place and return it (ready for deepspeed.initialize). The layout was
    checked (`check_layout`) by whoever chose it; `overlap_text_tower` is the chosen mode ("off", "stream",
    "thread")."""
    if dims.tp_size > 1:
        apply_tensor_parallel(model, dims)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if overlap_text_tower != "off":
        apply_text_overlap(model, overlap_text_tower, dims.text_tp_group if dims.tp_size > 1 else None)
    return model


def transformer_blocks(model) -> list[torch.nn.Module]:
    """The repeated blocks of the three towers: the units of activation checkpointing (and of pipeline stages)."""
    return [*model.vision.blocks, *model.text.blocks, *model.decoder.layers]


def apply_activation_checkpointing(model) -> None:
    """Each transformer block recomputes its forward in backward (torch.utils.checkpoint, non-reentrant).

    The block's forward is wrapped in place rather than the block moved into a wrapper module, so parameter
    names (and ZeRO-3's per-module hooks, which fire on the block's submodules again during recomputation)
    stay as they were. Without grad (eval, generation with KV caches) the block runs as is.
    """
    for block in transformer_blocks(model):
        if getattr(block, "activation_checkpointed", False):
            continue
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        block.forward = forward
        block.activation_checkpointed = True
