"""Build a CoCa for a parallel layout without any rank ever holding the whole model.

    model = build_parallel_model(cfg, dims, ds_config=..., activation_checkpointing=...)

1. The single-device CoCa is constructed on the meta device (no memory), drawing its `init_seed` from torch's
   global generator exactly as a CPU construction would.
2. `parallelize` swaps in the tensor-parallel layers (still meta, now shard-shaped) and wraps the blocks for
   activation checkpointing; under pipeline parallelism only this rank's stage is kept (`PipelineStage`).
3. `materialize` gives each parameter its initial value module by module, children before parents: the full
   single-device tensor of that one parameter is generated (`CoCa.initial_value`, a pure function of name and
   seed), this rank's tensor-parallel shard is cut out of it, and under ZeRO-3 the module's parameters are
   cast to the training dtype and partitioned over the data-parallel group right away
   (`deepspeed.zero.Init(module=...)`), before the next module is materialised. Peak memory: this rank's
   shards plus one parameter's full fp32 tensor.
The result equals, shard for shard, the single-device model built with the same seed (tested), and is what
`deepspeed.initialize` takes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from types import SimpleNamespace

import torch
import torch.distributed as torch_dist
import torch.nn as nn

from megacoca.config.deepspeed import precision_dtype, zero_stage
from megacoca.launch.deepspeed_comm import without_shared_memory_allreduce
from megacoca.models.coca import CoCa
from megacoca.parallel.dims import ParallelDims
from megacoca.parallel.parallelize import parallelize
from megacoca.parallel.pipeline.stage import PipelineStage
from megacoca.parallel.tensor import apply_tensor_parallel

TP_ATTRIBUTES = ("tensor_model_parallel", "partition_dim", "partition_stride", "tp_shard")
# After a parameter this large (its full fp32 init) is freed, hand the memory back to the OS: glibc keeps freed
# blocks below its (self-raising) mmap threshold in the heap, so without this the process's resident memory
# grows by about the model's size during the build, although the memory is free.
TRIM_AFTER_BYTES = 128 * 2**20


def meta_model(cfg, tp: int | None = None) -> nn.Module:
    """The single-device CoCa of `cfg` on the meta device (no memory), built without moving torch's global generator
    (the real build draws its init seed from it); with `tp`, swapped to the tensor-parallel layers of that degree as
    tensor rank 0 (shapes and `tp_shard`s only: no process group is needed). For counting and planning."""
    state = torch.get_rng_state()
    with torch.device("meta"):
        model = CoCa(cfg)
    torch.set_rng_state(state)
    if tp is not None:
        apply_tensor_parallel(model, SimpleNamespace(tp_group=None, tp_rank=0, tp_size=tp))
    return model


def _malloc_trim():
    """glibc's malloc_trim(0) where it exists (Linux); a no-op elsewhere."""
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else False
        except OSError:
            _LIBC = False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


_LIBC = None


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device | str, after_module=None,
                dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every meta parameter of `model` by its initial value (its tensor-parallel shard of it) on
    `device`, in `dtype` (default: the parameter's); `after_module(module)` runs once each module's own
    parameters are real (children first). A parameter shared by two modules (tied embeddings) is created once."""
    names: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), name)
    created: dict[int, nn.Parameter] = {}
    freed = 0
    for _, module in reversed(list(model.named_modules())):
        for key, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) in created:
                module._parameters[key] = created[id(param)]
                continue
            if not param.is_meta:
                continue
            shard = getattr(param, "tp_shard", None)
            name = names[id(param)]
            full = model.initial_value(name, shard.full_shape if shard is not None else tuple(param.shape))
            value = shard.cut(full) if shard is not None else full
            new = nn.Parameter(value.to(device=device, dtype=dtype or param.dtype), requires_grad=param.requires_grad)
            for attribute in TP_ATTRIBUTES:
                if hasattr(param, attribute):
                    setattr(new, attribute, getattr(param, attribute))
            module._parameters[key] = new
            created[id(param)] = new
            freed += full.numel() * full.element_size()
            del full, value
        if after_module is not None:
            after_module(module)
        if freed >= TRIM_AFTER_BYTES:
            _malloc_trim()
            freed = 0
    return model


def zero3_partitioner(ds_config: dict, dims: ParallelDims):
    """`after_module` for `materialize` under ZeRO-3: partition a module's parameters over the data-parallel
    group as soon as they exist (DeepSpeed skips parameters it already converted)."""
    import deepspeed  # heavy; the planner and conversions build meta models here without DeepSpeed

    if not deepspeed.comm.is_initialized():
        # zero.Init reads the data-parallel size through deepspeed.comm; over a torch process group that
        # deepspeed.initialize has not wrapped yet it would silently assume 1 rank.
        without_shared_memory_allreduce()
        deepspeed.init_distributed(dist_backend=torch_dist.get_backend(), dist_init_required=False)
    dtype = precision_dtype(ds_config)

    def partition(module: nn.Module) -> None:
        if any(True for _ in module.parameters(recurse=False)):
            deepspeed.zero.Init(module=module, data_parallel_group=dims.dp_group, config_dict_or_path=ds_config,
                                dtype=dtype, mpu=dims.mpu())

    return partition


def build_parallel_model(cfg, dims: ParallelDims, *, ds_config: dict, activation_checkpointing: bool = False,
                         device: torch.device | str | None = None, pipeline_split=None,
                         overlap_text_tower: str = "off"):
    """The CoCa of `cfg` for this rank: tensor-parallel shards, activation checkpointing, ZeRO-3 partitions; under
    pipeline parallelism (`pipeline_split`, a StageSplit) only this rank's stage of it. `overlap_text_tower`: the
    text tower's overlap mode (megacoca.parallel.overlap; "off" under a pipeline)."""
    if device is None:
        from deepspeed.accelerator import get_accelerator  # heavy: see zero3_partitioner

        accelerator = get_accelerator()
        device = torch.device(accelerator.device_name(accelerator.current_device()))
    with torch.device("meta"):
        model = CoCa(cfg)
    parallelize(model, dims, activation_checkpointing=activation_checkpointing,
                overlap_text_tower=overlap_text_tower if pipeline_split is None else "off")
    if pipeline_split is not None:
        model = PipelineStage(model, pipeline_split, dims.pp_rank)
    if zero_stage(ds_config) != 3:
        return materialize(model, device)  # the engine casts the module to the training dtype itself
    # Under ZeRO-3 DeepSpeed takes parameters made under zero.Init as already in the training dtype, as
    # parameters created inside its context would be: make them so (the fp32 masters start from these).
    return materialize(model, device, zero3_partitioner(ds_config, dims), dtype=precision_dtype(ds_config))
