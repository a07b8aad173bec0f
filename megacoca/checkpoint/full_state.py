"""A checkpoint's training state without its layout: per single-device parameter name, the fp32 master weight and
Adam's two moments, whole (every ZeRO partition, tensor-parallel shard and pipeline stage joined), and Adam's
step. The reading half of resuming under another layout; the writing half, into a new layout's ZeRO partitions,
is megacoca.checkpoint.reshape.

- ZeRO-1/2/3 (and DeepSpeed's bf16 optimizer): the base optimizer's state is kept per flat fp32 partition with
  the master weights' own layout (ZeRO-3: `optimizer_state_dict.state[i]` beside `fp32_flat_groups[i]`;
  ZeRO-1/2: `base_optimizer_state.state[i]` beside `single_partition_of_fp32_groups[i]`), so DeepSpeed's own
  zero_to_fp32 merge, given the moments' partitions in place of the masters', rebuilds each moment per
  parameter, padding and alignment included.
- ZeRO-0 (a client torch optimizer DeepSpeed steps as is): the module holds the weights and the model-states file
  the optimizer's state dict, keyed by position; the names of those positions are what the client state's
  `optimizer_param_names` records at save (megacoca.checkpoint.state).
- Tensor-parallel shards and pipeline stages are joined as the weights are (megacoca.checkpoint.consolidate).

Every file is checked first (megacoca.checkpoint.tags.open_tag: complete, tensors and plain data only).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from megacoca.checkpoint.consolidate import (
    as_mp_rank_00,
    merge_shards,
    quiet_zero_to_fp32,
    single_device_name,
    stage_merge_info,
    tensor_of,
)
from megacoca.checkpoint.files import BadCheckpointError, safe_load
from megacoca.checkpoint.tags import TagFiles, open_tag

KINDS = ("fp32", "exp_avg", "exp_avg_sq")


def _zero_rank_states(tag_dir: str, files: TagFiles, mp_rank: int) -> tuple[dict[str, dict], int]:
    """One model-parallel rank of a ZeRO checkpoint: {kind: {name: tensor}} and Adam's step."""
    with as_mp_rank_00(tag_dir, files.model_states(mp_rank), mp_rank) as scratch_tag, \
            quiet_zero_to_fp32() as zero_to_fp32:
        model_states = zero_to_fp32.parse_model_states(zero_to_fp32.get_model_state_files(scratch_tag))
    optim = [safe_load(os.path.join(tag_dir, name), mmap=True)["optimizer_state_dict"]
             for name in files.optim_states(mp_rank)]
    stage = int(optim[0]["zero_stage"])
    world = optim[0]["partition_count"]
    world = max(world) if isinstance(world, list) else world
    if stage == 3:
        masters, inner = "fp32_flat_groups", "optimizer_state_dict"
    else:
        masters, inner = "single_partition_of_fp32_groups", "base_optimizer_state"
    states: dict[str, dict] = {}
    for kind in KINDS:
        flats = [o[masters] if kind == "fp32" else [o[inner]["state"][i][kind] for i in range(len(o[masters]))]
                 for o in optim]
        if stage == 3:
            with quiet_zero_to_fp32():
                merged = zero_to_fp32._get_fp32_state_dict_from_zero3_checkpoint(world, flats, model_states, False)
        else:
            merged = zero_to_fp32._get_fp32_state_dict_from_zero2_checkpoint(
                world, flats, model_states, False, optim[0].get("param_alignment_paddings"))
        buffers = set(model_states[0].buffers)
        states[kind] = {name: value.contiguous() for name, value in merged.items() if name not in buffers}
    step = optim[0][inner]["state"][0]["step"]
    return states, int(step)


def _zero0_rank_states(tag_dir: str, files: TagFiles, mp_rank: int) -> tuple[dict[str, dict], int]:
    """One model-parallel rank of a ZeRO-0 checkpoint (the client torch optimizer's state by position)."""
    path = os.path.join(tag_dir, files.model_states(mp_rank)[0])
    saved = safe_load(path, mmap=True)
    names = saved.get("optimizer_param_names")
    optimizer = saved.get("optimizer")
    if not names or not optimizer:
        raise BadCheckpointError(f"{path} holds no optimizer state with parameter names (ZeRO-0 checkpoints "
                                 "written before megacoca recorded them): its moments cannot be read by name")
    positions = [index for group in optimizer["param_groups"] for index in group["params"]]
    ordered = [name for group in names for name in group]
    if len(positions) != len(ordered):
        raise BadCheckpointError(f"{path}: the optimizer holds {len(positions)} parameters, the recorded names "
                                 f"{len(ordered)}: the checkpoint is inconsistent")
    module = saved["module"]
    states: dict[str, dict] = {kind: {} for kind in KINDS}
    step = 0
    for index, name in zip(positions, ordered):
        state = optimizer["state"].get(index, {})
        states["fp32"][name] = module[name].float()
        for kind in KINDS[1:]:
            states[kind][name] = state[kind].float() if kind in state else torch.zeros_like(module[name].float())
        step = max(step, int(state.get("step", 0)))
    return states, step


def iter_full_state(path: str, files: TagFiles | None = None) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(single-device name, {"fp32", "exp_avg", "exp_avg_sq"}) of every trained parameter of a checkpoint (tag or
    checkpoint directory) of any layout, one parameter at a time (a pipeline stage's ranks at a time in memory).
    With `files`, `path` is a tag directory that `open_tag` has already checked."""
    tag_dir, files = open_tag(path) if files is None else (path, files)
    read = _zero_rank_states if files.zero else _zero0_rank_states
    tp = files.layout.tp
    for stage in range(files.layout.pp):
        ranks = [read(tag_dir, files, stage * tp + rank)[0] for rank in range(tp)]
        shard_map, aliases = stage_merge_info(tag_dir, files, stage)
        for name in ranks[0]["fp32"]:
            entry = shard_map.get(name) or shard_map.get(aliases.get(single_device_name(name), ""))
            merged = {}
            for kind in KINDS:
                shards = [tensor_of(state[kind], name, aliases) for state in ranks]
                if any(shard is None for shard in shards):
                    raise BadCheckpointError(f"{name} ({kind}) is missing from a tensor-parallel rank of pipeline "
                                             f"stage {stage}: the checkpoint is inconsistent")
                merged[kind] = merge_shards(f"{name} ({kind})", shards, entry).detach()
            yield single_device_name(name), merged


def adam_step(path: str, files: TagFiles | None = None) -> int:
    """Adam's step count in a checkpoint (the optimizer steps taken, skipped ones not counted), read without
    reading the tensors. With `files`, `path` is a tag directory that `open_tag` has already checked."""
    tag_dir, files = open_tag(path) if files is None else (path, files)
    if not files.zero:
        return _zero0_rank_states(tag_dir, files, 0)[1]  # the module file, mapped
    optim = safe_load(os.path.join(tag_dir, files.optim_states(0)[0]), mmap=True)["optimizer_state_dict"]
    inner = "optimizer_state_dict" if int(optim["zero_stage"]) == 3 else "base_optimizer_state"
    return int(optim[inner]["state"][0]["step"])
