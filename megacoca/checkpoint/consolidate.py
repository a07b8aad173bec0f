"""A megacoca/DeepSpeed checkpoint as the single-device model's tensors, one at a time (no DeepSpeed engine).

Per model-parallel rank r (the tensor rank, or stage x tp + tensor rank under pipeline parallelism), the files
named `*mp_rank_{r:02d}*`: ZeRO-1/2/3 (and bf16-optimizer) checkpoints go through DeepSpeed's
`get_fp32_state_dict_from_zero_checkpoint` in lazy mode (it merges the fp32 master partitions of every
data-parallel rank; it only knows mp rank 00, so each rank's files are shown to it under that name in a scratch
directory of links); ZeRO-0 checkpoints hold that rank's module in `mp_rank_{r:02d}_model_states.pt`. With tensor
parallelism the ranks' tensors are merged with the shard map the checkpoint recorded (`tensor_parallel` in the
client state): shards concatenated along their dim and cut to the unpadded size; replicated tensors taken once,
after checking that every rank holds the same values. Under pipeline parallelism the stages, disjoint, come one
after the other.

Memory (`iter_consolidated`): the optimizer files are memory-mapped (the Adam moments in them are never read).
ZeRO-3 gathers each tensor from the ranks' partitions when it is asked for: beyond the mapped files, one tensor.
ZeRO-1/2: DeepSpeed's merge concatenates the data-parallel partitions of a model-parallel rank into one flat fp32
vector, so one fp32 copy of one pipeline stage is held (of the whole model at pp = 1), plus one tensor. ZeRO-0:
the module files are mapped; one tensor at a time is read.

A checkpoint is checked before anything is read (megacoca.checkpoint.tags.open_tag): its COMPLETE marker, every
file the layout implies (`missing_files`: each data-parallel rank's optimizer partition, each model-parallel rank's
model states), and every file loadable as tensors and plain data (megacoca.checkpoint.files). DeepSpeed's zero_to_fp32
loads with `weights_only=False`; while megacoca uses it, its `torch.load` is `safe_load` (`quiet_zero_to_fp32`), so a
file replaced after that check is refused too. A missing or unreadable file is one `BadCheckpointError` line naming
it.

The pieces megacoca.checkpoint.full_state reads the optimizer's state with are public here: `merge_shards`,
`tensor_of`, `shared_params`, `single_device_name`, `as_mp_rank_00`, `quiet_zero_to_fp32`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator

import torch

from megacoca.checkpoint.files import BadCheckpointError, safe_load
from megacoca.checkpoint.tags import TagFiles, client_state, open_tag


def single_device_name(name: str) -> str:
    """A name of DeepSpeed's files without the engine's `module.` prefix."""
    return name[len("module."):] if name.startswith("module.") else name


def _rank_tensors(tag_dir: str, files: TagFiles, mp_rank: int) -> dict:
    """One model-parallel rank's tensors, lazily: DeepSpeed's lazy fp32 state dict (ZeRO-3: GatheredTensors that
    assemble themselves on `.contiguous()`), or the memory-mapped module of a ZeRO-0 file."""
    if not files.zero:
        return safe_load(os.path.join(tag_dir, files.model_states(mp_rank)[0]), mmap=True)["module"]
    names = files.model_states(mp_rank) + files.optim_states(mp_rank)
    with as_mp_rank_00(tag_dir, names, mp_rank) as scratch_tag, quiet_zero_to_fp32() as zero_to_fp32:
        # The files are mapped when read: the tensors outlive the links.
        return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(
            os.path.dirname(scratch_tag), tag=os.path.basename(scratch_tag), lazy_mode=True)


class _VerifiedTorch:
    """torch, but `load` is megacoca's `safe_load` (weights_only, ALLOWED_GLOBALS): what zero_to_fp32 sees as its
    `torch` while megacoca uses it, so its `torch.load(..., weights_only=False)` calls never unpickle code, even
    from a file replaced after the tag was verified."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(f, map_location=None, mmap=False, weights_only=None, **kwargs):
        return safe_load(os.fspath(f), map_location="cpu" if map_location is None else map_location, mmap=bool(mmap))


@contextlib.contextmanager
def quiet_zero_to_fp32():
    """DeepSpeed's zero_to_fp32 module, its progress bars off (they went to the stderr of every command that read a
    ZeRO-3 checkpoint, and of every rank resuming under another layout) and its file loads through `safe_load`
    (`_VerifiedTorch`): no path of megacoca reads a checkpoint with `weights_only=False`."""
    from deepspeed.utils import zero_to_fp32  # heavy: deepspeed, only when a ZeRO checkpoint is read

    bar, real_torch = zero_to_fp32.tqdm, zero_to_fp32.torch
    zero_to_fp32.tqdm = lambda iterable, *args, **kwargs: iterable
    zero_to_fp32.torch = _VerifiedTorch()
    try:
        yield zero_to_fp32
    finally:
        zero_to_fp32.tqdm, zero_to_fp32.torch = bar, real_torch


@contextlib.contextmanager
def as_mp_rank_00(tag_dir: str, names: list[str], mp_rank: int) -> Iterator[str]:
    """A scratch tag directory in which the files `names` of model-parallel rank `mp_rank` appear (as links) under
    rank 00's names: DeepSpeed's zero_to_fp32 only knows model-parallel rank 00."""
    tag = os.path.basename(tag_dir)
    marker = f"mp_rank_{mp_rank:02d}"
    with tempfile.TemporaryDirectory(prefix="megacoca_consolidate_") as scratch:
        os.makedirs(os.path.join(scratch, tag))
        for name in names:
            os.symlink(os.path.abspath(os.path.join(tag_dir, name)),
                       os.path.join(scratch, tag, name.replace(marker, "mp_rank_00")))
        yield os.path.join(scratch, tag)


def shared_params(tag_dir: str, files: TagFiles, mp_ranks) -> dict[str, str]:
    """Tied names (a name -> the parameter it shares), from the model states of any of `mp_ranks`: DeepSpeed records
    the pair on some tensor-parallel ranks only (measured: ZeRO-1 at TP=2 keeps it on rank 0), so a rank's
    consolidated state may lack the alias its peers hold."""
    pairs: dict[str, str] = {}
    for mp_rank in mp_ranks:
        state = safe_load(os.path.join(tag_dir, files.model_states(mp_rank)[0]), mmap=True)
        shared = state.get("shared_params") or {}
        pairs.update({single_device_name(k): single_device_name(v) for k, v in shared.items()})
    return pairs


def tensor_of(state: dict, name: str, aliases: dict[str, str]):
    """`state[name]`, or the tensor it is tied to when this rank's state lacks the alias; None if neither."""
    if name in state:
        return state[name]
    target = aliases.get(single_device_name(name))
    for key in (target, f"module.{target}") if target else ():
        if key in state:
            return state[key]
    return None


def _materialize(value) -> torch.Tensor:
    return value.contiguous()  # a GatheredTensor assembles itself; a tensor is returned as it is


def merge_shards(name: str, shards: list[torch.Tensor], entry: dict | None) -> torch.Tensor:
    """The single-device tensor from the tensor-parallel ranks' shards (rank order) and its shard-map entry
    (None: replicated)."""
    if entry is None:  # replicated
        for rank, other in enumerate(shards[1:], start=1):
            if not torch.equal(other, shards[0]):
                raise BadCheckpointError(f"replicated tensor {name} differs between tensor-parallel ranks 0 and "
                                         f"{rank}: the checkpoint is inconsistent")
        return shards[0]
    dim = entry["dim"]
    whole = torch.cat(shards, dim=dim)
    if whole.shape[dim] != entry["padded"]:
        raise BadCheckpointError(f"{name}: the ranks' shards add up to {tuple(whole.shape)}, the layout says "
                                 f"{entry['padded']} along dim {dim}")
    return whole.narrow(dim, 0, entry["full_shape"][dim]).clone()


def stage_merge_info(tag_dir: str, files: TagFiles, stage: int) -> tuple[dict, dict[str, str]]:
    """How pipeline stage `stage`'s tensor-parallel ranks merge: the shard map its client state recorded
    ({name: {"dim", "full_shape", "padded"}}), and its tied names (`shared_params`; none at tp = 1)."""
    tp = files.layout.tp
    shard_map = (client_state(tag_dir, stage * tp).get("tensor_parallel") or {}).get("params", {})
    aliases = shared_params(tag_dir, files, range(stage * tp, (stage + 1) * tp)) if tp > 1 else {}
    return shard_map, aliases


def iter_consolidated(path: str, files: TagFiles | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the single-device model in a checkpoint (tag directory or checkpoint directory), of any
    ZeRO stage, tensor-parallel and pipeline-parallel degree, one tensor at a time: the fp32 master weights of a
    ZeRO/bf16-optimizer checkpoint, the module's tensors (their dtype) of a ZeRO-0 one. Pipeline stage s wrote
    model-parallel ranks s * tp ... s * tp + tp - 1 under the single-device parameter names; the stages' tensors
    are disjoint and together the whole model. A tensor shared under two names (a tied head) comes under both.
    With `files`, `path` is a tag directory that `open_tag` has already checked."""
    tag_dir, files = open_tag(path) if files is None else (path, files)
    tp = files.layout.tp
    seen: dict[str, int] = {}
    for stage in range(files.layout.pp):
        ranks = [_rank_tensors(tag_dir, files, stage * tp + rank) for rank in range(tp)]
        shard_map, aliases = stage_merge_info(tag_dir, files, stage)
        for name in list(ranks[0]):
            key = single_device_name(name)
            if key in seen:
                raise BadCheckpointError(f"pipeline stages {seen[key]} and {stage} both hold {key}: the checkpoint "
                                         "is inconsistent")
            seen[key] = stage
            if tp == 1:
                tensor = _materialize(ranks[0][name])
                if not files.zero:
                    tensor = tensor.clone()  # not a view of a mapped file that a later save could remove
            else:
                shards = [tensor_of(state, name, aliases) for state in ranks]
                missing = [rank for rank, shard in enumerate(shards) if shard is None]
                if missing:
                    raise BadCheckpointError(f"{name} is missing from tensor-parallel rank {missing[0]} of pipeline "
                                             f"stage {stage}: the checkpoint is inconsistent")
                entry = shard_map.get(name) or shard_map.get(aliases.get(key, ""))
                tensor = merge_shards(key, [_materialize(shard) for shard in shards], entry)
            yield key, tensor
        del ranks


def consolidated_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The whole fp32 state dict at once (`iter_consolidated` collected). For the model itself use
    `megacoca.load`; for a model directory, `megacoca convert from-deepspeed` (megacoca.checkpoint.export): both
    stream."""
    return {name: tensor.float() for name, tensor in iter_consolidated(path)}
