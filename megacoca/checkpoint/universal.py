"""What DeepSpeed's universal checkpoints need to know about megacoca's tensor parallelism: UNIVERSAL_CHECKPOINT_INFO.

`python -m deepspeed.checkpoint.ds_to_universal` (deepspeed/checkpoint/ds_to_universal.py, `merge_tp_slices`)
joins each parameter's tensor-parallel slices by matching its name against the regex lists of this dict, which
megacoca writes into every checkpoint's client state (megacoca.checkpoint.state.save_checkpoint); it also writes,
per parameter, how the slices were joined (`cat_dim`, `vocab_tensor`), which DeepSpeed's universal loader
(deepspeed/checkpoint/universal_checkpoint.py, `load_hp_checkpoint_state`) uses to cut the loading run's shard.
One exact, anchored pattern per trainable parameter, from its `tp_shard` (megacoca.parallel.tensor):
- sharded along dim 1 (row-parallel weights): PARAMETER_WITH_ROW_PARALLELISM_PATTERNS;
- sharded along dim 0 (column-parallel weights and biases): no pattern, DeepSpeed's default (dim 0);
- the vocabulary-parallel token embedding and caption head weights, (V, width) padded to a multiple of tp:
  VOCABULARY_PARAMETER_PATTERNS and ORIGINAL_VOCAB_SIZE: the universal tensor has the V real rows, and the loader
  pads it again for the loading run's tensor-parallel degree, zero rows at the end, as TensorShard does;
- not sharded (LayerNorms, row-parallel biases, positional/class/CLS embeddings, pooler queries, projections, the
  logit scale): TP_REPLICATED_PARAMETER_PATTERNS (DeepSpeed checks that the ranks' copies are equal).
The dict describes the whole model, on every rank: ds_to_universal reads it from model-parallel rank 0's file
only and merges every pipeline stage's parameters with it. A pipeline stage, and a model at tp = 1 (no `tp_shard`
at all), take it from the same config built on the meta device and swapped by `apply_tensor_parallel` at the run's
degree: at tp = 1 too, so that the universal checkpoint records what a tensor-parallel run cuts (recorded as
replicated, a weight would be cut along dim 0 by the loader, wrong for the row-parallel ones).

Not expressible: the caption head's bias (`decoder_bias=True`) when the vocabulary is padded. DeepSpeed strips
vocabulary padding with `param[:original_vocab_size, :]` (two-dimensional only) and has no other way to drop
padding (an affine map must place every element of a shard in the full tensor), so the checkpoint names it in
AUTOTP_UNSUPPORTED_PARAMETER_PATTERNS with the reason, and ds_to_universal refuses with that line. Unpadded (tp
divides V) it is an ordinary dim-0 shard. DeepSpeed's strict check (every pattern used; `--no_strict` turns it
off) is why frozen parameters, which have no optimizer state, get no pattern. The names are those of DeepSpeed's
`param_shapes` and `param_slice_mappings`: the module's parameter names, no "module." prefix.
"""

from __future__ import annotations

import re

import torch.nn as nn
from deepspeed.checkpoint.constants import (
    AUTOTP_UNSUPPORTED_PARAMETER_PATTERNS,
    ORIGINAL_VOCAB_SIZE,
    PARAMETER_WITH_ROW_PARALLELISM_PATTERNS,
    TP_REPLICATED_PARAMETER_PATTERNS,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    VOCABULARY_PARAMETER_PATTERNS,
)

from megacoca.parallel.build import meta_model
from megacoca.parallel.tensor import VocabParallelCaptionHead, VocabParallelEmbedding


def _pattern(name: str) -> str:
    return f"^{re.escape(name)}$"


def _whole_model(module: nn.Module) -> nn.Module:
    """The whole model as this run's tensor parallelism shards it: `module` itself when it is the whole model and
    tensor-parallel, else the same config built on the meta device and swapped by `apply_tensor_parallel` at this
    run's degree (tp = 1 holds no `tp_shard`; a pipeline stage holds only its own parameters)."""
    shards = [param.tp_shard for param in module.parameters() if hasattr(param, "tp_shard")]
    if shards and not hasattr(module, "block_indices"):  # block_indices: a PipelineStage
        return module
    return meta_model(module.cfg, shards[0].size if shards else 1)


def universal_checkpoint_info(module: nn.Module) -> dict:
    """DeepSpeed's UNIVERSAL_CHECKPOINT_INFO for `module` (a megacoca CoCa or pipeline stage, tensor-parallel or
    not), plain data (lists, strings, numbers). It describes the whole model, the same on every rank:
    ds_to_universal reads it from model-parallel rank 0's file only, and merges every pipeline stage with it."""
    whole = _whole_model(module)
    trainable = {name: param.requires_grad for name, param in module.named_parameters()}
    vocabulary = {f"{owner_name}.{name}" for owner_name, owner in whole.named_modules()
                  if isinstance(owner, (VocabParallelEmbedding, VocabParallelCaptionHead))
                  for name, _ in owner.named_parameters(recurse=False)}
    replicated, row_parallel, vocab, unsupported = [], [], [], {}
    vocab_sizes = set()
    for name, param in whole.named_parameters():
        if not trainable.get(name, param.requires_grad):
            continue
        shard = getattr(param, "tp_shard", None)
        if shard is None:
            replicated.append(_pattern(name))
        elif name in vocabulary and len(shard.full_shape) == 2:
            vocab.append(_pattern(name))
            vocab_sizes.add(shard.full_shape[0])
        elif shard.padded != shard.full_shape[shard.dim]:
            unsupported[_pattern(name)] = (
                f"megacoca's {name} is a {len(shard.full_shape)}-D tensor padded from {shard.full_shape[shard.dim]} "
                f"to {shard.padded} along dim {shard.dim}, and DeepSpeed strips vocabulary padding from 2-D tensors "
                "only; export with `megacoca convert from-deepspeed` instead")
        elif shard.dim == 1:
            row_parallel.append(_pattern(name))
        elif shard.dim != 0:
            raise ValueError(f"universal_checkpoint_info: {name} is sharded along dim {shard.dim}; DeepSpeed "
                             "joins tensor-parallel slices along dim 0 or 1")
    if len(vocab_sizes) > 1:
        raise ValueError(f"universal_checkpoint_info: vocabulary parameters of sizes {sorted(vocab_sizes)}; "
                         "DeepSpeed records one original vocabulary size")
    info = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE,
            TP_REPLICATED_PARAMETER_PATTERNS: replicated,
            PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: row_parallel,
            VOCABULARY_PARAMETER_PATTERNS: vocab}
    if vocab_sizes:
        info[ORIGINAL_VOCAB_SIZE] = vocab_sizes.pop()
    if unsupported:
        info[AUTOTP_UNSUPPORTED_PARAMETER_PATTERNS] = unsupported
    return info
