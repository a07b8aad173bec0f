"""Megatron-style tensor parallelism for CoCa, one concern a module as Megatron-LM's tensor_parallel package:

- mappings.py       the autograd collectives the layers are written with: copy_to_tp (identity forward,
                    all-reduce of the gradient backward), reduce_from_tp (all-reduce forward, identity
                    backward), gather_from_tp (all-gather of the last dim forward, this rank's slice backward)
- layers.py         TensorShard (where a shard sits in the single-device tensor) and the layers:
                    Column/RowParallelLinear, TensorParallelAttention, VocabParallelEmbedding,
                    VocabParallelCaptionHead
- cross_entropy.py  the vocabulary-parallel cross-entropy in torch (the fused Triton one is
                    megacoca_kernels.linear_cross_entropy with a tp_group)
- swap.py           the swap plan applied to a built single-device model (apply_tensor_parallel), the check
                    that a degree splits it (check_tensor_parallel), another communicator for a part of the
                    model (set_tensor_parallel_group: the overlapped text tower's), and is_tensor_parallel (a
                    parameter is a shard: it carries `tp_shard`; the checkpoint's shard map, checkpoint.tags,
                    reads those)

A new tensor-parallel layer goes in layers.py, issues its collectives through mappings.py only, and is swapped
in by swap.py. Every public name is importable from this package.
"""

from megacoca.parallel.tensor.cross_entropy import vocab_parallel_cross_entropy
from megacoca.parallel.tensor.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallelAttention,
    TensorShard,
    VocabParallelCaptionHead,
    VocabParallelEmbedding,
    padded_size,
)
from megacoca.parallel.tensor.mappings import copy_to_tp, gather_from_tp, reduce_from_tp
from megacoca.parallel.tensor.swap import (
    apply_tensor_parallel,
    check_tensor_parallel,
    is_tensor_parallel,
    set_tensor_parallel_group,
)

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "TensorParallelAttention",
    "TensorShard",
    "VocabParallelCaptionHead",
    "VocabParallelEmbedding",
    "apply_tensor_parallel",
    "check_tensor_parallel",
    "copy_to_tp",
    "gather_from_tp",
    "is_tensor_parallel",
    "padded_size",
    "reduce_from_tp",
    "set_tensor_parallel_group",
    "vocab_parallel_cross_entropy",
]
