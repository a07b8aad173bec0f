"""Whole single-device tensors from a parallel engine's parameters (tests only: a real run never gathers them)."""

from __future__ import annotations

import deepspeed
import torch
import torch.distributed as dist


def full_tensors(module, dims, value_of) -> dict:
    """{name: the single-device tensor}: `value_of(param)` (this rank's tensor-parallel shard, whole over ZeRO)
    gathered over the tensor-parallel group and cut back to the unpadded shape. A collective."""
    out = {}
    for name, param in module.named_parameters():
        value = value_of(param).detach().float()
        shard = getattr(param, "tp_shard", None)
        if shard is not None:
            parts = [torch.empty_like(value) for _ in range(dims.tp_size)]
            dist.all_gather(parts, value.contiguous(), group=dims.tp_group)
            value = torch.cat(parts, dim=shard.dim).narrow(shard.dim, 0, shard.full_shape[shard.dim])
        out[name] = value.clone()
    return out


def fp32_master(param):
    """The optimizer's fp32 master of a parameter, whole over ZeRO partitions (ZeRO-0 fp32: the parameter)."""
    master = deepspeed.utils.safe_get_full_fp32_param(param)
    return param if master is None else master


def module_values(module, dims) -> dict:
    """The module's own (training-dtype) parameter values, gathered over ZeRO-3 and tensor parallelism."""
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        return full_tensors(module, dims, lambda param: param)


def union_over_stages(values: dict, dims) -> dict:
    """Every pipeline stage's {name: tensor} merged into one dict (a collective over the pipeline group; the
    stages hold disjoint parameters). Without a pipeline, `values` itself."""
    if dims.pp_size == 1:
        return values
    parts = [None] * dims.pp_size
    dist.all_gather_object(parts, values, group=dims.pp_group)
    merged = {}
    for part in parts:
        assert not merged.keys() & part.keys(), "two pipeline stages hold the same parameter"
        merged.update(part)
    return merged
