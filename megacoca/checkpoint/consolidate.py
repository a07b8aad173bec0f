"""A megacoca/DeepSpeed checkpoint as the single-device model's tensors, one at a time (no DeepSpeed engine).

Per model-parallel rank r (the tensor rank, or stage x tp + tensor rank under pipeline parallelism), the files
named `*mp_rank_{r:02d}*`: ZeRO-1/2/3 (and bf16-optimizer) checkpoints go through DeepSpeed's
`get_fp32_state_dict_from_zero_checkpoint` in lazy mode (it merges the fp32 master partitions of every
data-parallel rank; it only knows mp rank 00, so each rank's files are shown to it under that name in a scratch
directory of links); ZeRO-0 checkpoints hold that rank's module in `mp_rank_{r:02d}_model_states.pt`. With tensor
parallelism the ranks' tensors are merged with the layout the checkpoint recorded (`tensor_parallel` in the client
state): shards concatenated along their dim and cut to the unpadded size; replicated tensors taken once, after
checking that every rank holds the same values. Under pipeline parallelism the stages, disjoint, come one after the
other.

Memory (`iter_consolidated`): the optimizer files are memory-mapped (the Adam moments in them are never read).
ZeRO-3 gathers each tensor from the ranks' partitions when it is asked for: beyond the mapped files, one tensor.
ZeRO-1/2: DeepSpeed's merge concatenates the data-parallel partitions of a model-parallel rank into one flat fp32
vector, so one fp32 copy of one pipeline stage is held (of the whole model at pp = 1), plus one tensor. ZeRO-0:
the module files are mapped; one tensor at a time is read.

A checkpoint is checked before anything is read (`resolve_tag_dir`): its COMPLETE marker, every file the layout
implies (`missing_files`: each data-parallel rank's optimizer partition, each model-parallel rank's model
states), and every file loadable as tensors and plain data (megacoca.checkpoint.files; DeepSpeed's zero_to_fp32
loads with `weights_only=False`, so this comes first). A missing or unreadable file is one `BadCheckpointError`
line naming it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Iterator

import torch

from megacoca.checkpoint.files import BadCheckpointError, checkpoint_files, safe_load, verify_files
from megacoca.checkpoint.state import COMPLETE, LATEST

_OPTIM = re.compile(r"^(?P<prefix>.*?)zero_pp_rank_(?P<dp>\d+)_mp_rank_(?P<mp>\d+)_optim_states\.pt$")


@dataclass(frozen=True)
class Layout:
    """How a checkpoint was written: pp x tp model-parallel ranks, each with dp data-parallel ranks; `zero`: the
    fp32 master weights are in per-data-parallel-rank optimizer files (ZeRO-1/2/3, DeepSpeed's bf16 optimizer),
    else (ZeRO-0) in each model-parallel rank's module; `zero3`: the model states are per data-parallel rank too."""

    pp: int
    tp: int
    dp: int
    zero: bool
    zero3: bool
    optim_prefix: str = ""

    @property
    def mp(self) -> int:
        return self.pp * self.tp

    def model_states(self, mp_rank: int) -> list[str]:
        if self.zero3:
            return [f"zero_pp_rank_{d}_mp_rank_{mp_rank:02d}_model_states.pt" for d in range(self.dp)]
        return [f"mp_rank_{mp_rank:02d}_model_states.pt"]

    def optim_states(self, mp_rank: int) -> list[str]:
        if not self.zero:
            return []
        return [f"{self.optim_prefix}zero_pp_rank_{d}_mp_rank_{mp_rank:02d}_optim_states.pt" for d in range(self.dp)]

    def describe(self) -> str:
        return f"dp={self.dp} x pp={self.pp} x tp={self.tp}"


def _first_model_states(tag_dir: str) -> str:
    """The model-states file to read the layout from: model-parallel rank 0's (of any data-parallel rank under
    ZeRO-3: each holds the client state)."""
    candidates = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    candidates += sorted(os.path.basename(path) for path in
                         glob.glob(os.path.join(tag_dir, "zero_pp_rank_*_mp_rank_00_model_states.pt")))
    for name in candidates:
        if os.path.isfile(os.path.join(tag_dir, name)):
            return os.path.join(tag_dir, name)
    raise BadCheckpointError(f"{tag_dir} is incomplete: {os.path.join(tag_dir, 'mp_rank_00_model_states.pt')} "
                             "(DeepSpeed's model states of model-parallel rank 0) is missing")


def read_layout(tag_dir: str) -> Layout:
    """The layout from the first model-states file: megacoca's client state (`pipeline`, `tensor_parallel`,
    `dp_size`), else DeepSpeed's own (`checkpoint_parallel_dimensions`, `dp_world_size`)."""
    first = _first_model_states(tag_dir)
    state = safe_load(first, mmap=True)
    dims = state.get("checkpoint_parallel_dimensions") or {}
    pipeline = state.get("pipeline") or {}
    tp = pipeline.get("tp") or (state.get("tensor_parallel") or {}).get("size") or dims.get("tp_degree") or 1
    pp = pipeline.get("pp") or dims.get("pp_degree") or 1
    dp = state.get("dp_world_size") or state.get("dp_size") or 1
    # ZeRO-0 keeps its optimizer (with the weights) in the model-states file; otherwise the fp32 masters are in
    # the optimizer partition files.
    zero = "optimizer" in state and state["optimizer"] is None
    names = os.listdir(tag_dir)
    prefixes = sorted({match.group("prefix") for match in map(_OPTIM.match, names) if match})
    return Layout(pp=int(pp), tp=int(tp), dp=int(dp), zero=zero or bool(prefixes),
                  zero3=os.path.basename(first).startswith("zero_pp_rank_"),
                  optim_prefix=prefixes[0] if prefixes else "")


def missing_files(tag_dir: str, layout: Layout) -> list[str]:
    """Every file the layout implies that is not in `tag_dir` (model states, optimizer partitions), in rank order."""
    missing = []
    for mp_rank in range(layout.mp):
        for name in layout.model_states(mp_rank) + layout.optim_states(mp_rank):
            if not os.path.isfile(os.path.join(tag_dir, name)):
                missing.append(os.path.join(tag_dir, name))
    return missing


def check_complete(tag_dir: str) -> Layout:
    """The layout, after checking that every file it implies is there; BadCheckpointError names the first one
    missing."""
    layout = read_layout(tag_dir)
    missing = missing_files(tag_dir, layout)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise BadCheckpointError(f"{tag_dir} is incomplete: {missing[0]} is missing{more}; the checkpoint was "
                                 f"written by {layout.describe()} ranks")
    return layout


def resolve_tag_dir(path: str) -> str:
    """A tag directory as given, or the `latest` complete one of a checkpoint directory; checked (COMPLETE, every
    file of the layout there, every file tensors and plain data) before anything reads it."""
    return open_tag(path)[0]


def open_tag(path: str) -> tuple[str, Layout]:
    """(tag directory, layout) of a checkpoint or tag directory, checked as `resolve_tag_dir` says."""
    tag_dir, layout = locate_tag(path)
    verify_files(checkpoint_files(tag_dir))  # before anything (DeepSpeed's zero_to_fp32 too) unpickles one
    return tag_dir, layout


def locate_tag(path: str) -> tuple[str, Layout]:
    """(tag directory, layout) of a checkpoint or tag directory: COMPLETE, and every file of its layout there
    (what the CLI checks while parsing arguments; `open_tag` also checks every file's contents, once, when the
    checkpoint is read)."""
    path = path.rstrip("/") or "/"
    if os.path.isfile(os.path.join(path, LATEST)) and not os.path.isfile(os.path.join(path, COMPLETE)):
        with open(os.path.join(path, LATEST)) as f:
            path = os.path.join(path, f.read().strip())
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory {path}")
    if not os.path.isfile(os.path.join(path, COMPLETE)):
        raise FileNotFoundError(f"{path} has no {COMPLETE} marker: the save was interrupted")
    return path, check_complete(path)


def client_state(tag_dir: str, mp_rank: int = 0) -> dict:
    """DeepSpeed's client state (step, dp_size, the run's job config, the tensor-parallel layout of that rank's
    stage, the pipeline layout) from the first model-states file of model-parallel rank `mp_rank`."""
    files = sorted(glob.glob(os.path.join(tag_dir, f"*mp_rank_{mp_rank:02d}_model_states.pt")))
    if not files:
        return {}
    state = safe_load(files[0], mmap=True)
    return {key: state[key] for key in ("step", "dp_size", "config", "tensor_parallel", "pipeline") if key in state}


def _strip(name: str) -> str:
    return name[len("module."):] if name.startswith("module.") else name


def _rank_tensors(tag_dir: str, layout: Layout, mp_rank: int) -> dict:
    """One model-parallel rank's tensors, lazily: DeepSpeed's lazy fp32 state dict (ZeRO-3: GatheredTensors that
    assemble themselves on `.contiguous()`), or the memory-mapped module of a ZeRO-0 file."""
    if not layout.zero:
        return safe_load(os.path.join(tag_dir, layout.model_states(mp_rank)[0]), mmap=True)["module"]
    names = layout.model_states(mp_rank) + layout.optim_states(mp_rank)
    with as_mp_rank_00(tag_dir, names, mp_rank) as scratch_tag, quiet_zero_to_fp32() as zero_to_fp32:
        # The files are mapped when read: the tensors outlive the links.
        return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(
            os.path.dirname(scratch_tag), tag=os.path.basename(scratch_tag), lazy_mode=True)


@contextlib.contextmanager
def quiet_zero_to_fp32():
    """DeepSpeed's zero_to_fp32 module, its progress bars off (they went to the stderr of every command that read a
    ZeRO-3 checkpoint, and of every rank resuming under another layout)."""
    from deepspeed.utils import zero_to_fp32

    bar = zero_to_fp32.tqdm
    zero_to_fp32.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield zero_to_fp32
    finally:
        zero_to_fp32.tqdm = bar


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


def shared_params(tag_dir: str, layout: Layout, mp_ranks) -> dict[str, str]:
    """Tied names (a name -> the parameter it shares), from the model states of any of `mp_ranks`: DeepSpeed records
    the pair on some tensor-parallel ranks only (measured: ZeRO-1 at TP=2 keeps it on rank 0), so a rank's
    consolidated state may lack the alias its peers hold."""
    pairs: dict[str, str] = {}
    for mp_rank in mp_ranks:
        state = safe_load(os.path.join(tag_dir, layout.model_states(mp_rank)[0]), mmap=True)
        pairs.update({_strip(k): _strip(v) for k, v in (state.get("shared_params") or {}).items()})
    return pairs


def tensor_of(state: dict, name: str, aliases: dict[str, str]):
    """`state[name]`, or the tensor it is tied to when this rank's state lacks the alias; None if neither."""
    if name in state:
        return state[name]
    target = aliases.get(_strip(name))
    for key in (target, f"module.{target}") if target else ():
        if key in state:
            return state[key]
    return None


def _materialize(value) -> torch.Tensor:
    return value.contiguous()  # a GatheredTensor assembles itself; a tensor is returned as it is


def _merge(name: str, shards: list[torch.Tensor], entry: dict | None) -> torch.Tensor:
    """The single-device tensor from the tensor-parallel ranks' shards (rank order) and its layout entry."""
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


def iter_consolidated(path: str, layout: Layout | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the single-device model in a checkpoint (tag directory or checkpoint directory), of any
    ZeRO stage, tensor-parallel and pipeline-parallel degree, one tensor at a time: the fp32 master weights of a
    ZeRO/bf16-optimizer checkpoint, the module's tensors (their dtype) of a ZeRO-0 one. Pipeline stage s wrote
    model-parallel ranks s * tp ... s * tp + tp - 1 under the single-device parameter names; the stages' tensors
    are disjoint and together the whole model. A tensor shared under two names (a tied head) comes under both.
    With `layout`, `path` is a tag directory that `open_tag` has already checked."""
    tag_dir, layout = open_tag(path) if layout is None else (path, layout)
    seen: dict[str, int] = {}
    for stage in range(layout.pp):
        ranks = [_rank_tensors(tag_dir, layout, stage * layout.tp + rank) for rank in range(layout.tp)]
        tp_layout = (client_state(tag_dir, stage * layout.tp).get("tensor_parallel") or {}).get("params", {})
        aliases = shared_params(tag_dir, layout, range(stage * layout.tp, (stage + 1) * layout.tp)) \
            if layout.tp > 1 else {}
        for name in list(ranks[0]):
            key = _strip(name)
            if key in seen:
                raise BadCheckpointError(f"pipeline stages {seen[key]} and {stage} both hold {key}: the checkpoint "
                                         "is inconsistent")
            seen[key] = stage
            if layout.tp == 1:
                tensor = _materialize(ranks[0][name])
                if not layout.zero:
                    tensor = tensor.clone()  # not a view of a mapped file that a later save could remove
            else:
                shards = [tensor_of(state, name, aliases) for state in ranks]
                missing = [rank for rank, shard in enumerate(shards) if shard is None]
                if missing:
                    raise BadCheckpointError(f"{name} is missing from tensor-parallel rank {missing[0]} of pipeline "
                                             f"stage {stage}: the checkpoint is inconsistent")
                entry = tp_layout.get(name) or tp_layout.get(aliases.get(key, ""))
                tensor = _merge(key, [_materialize(shard) for shard in shards], entry)
            yield key, tensor
        del ranks


def consolidated_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The whole fp32 state dict at once (`iter_consolidated` collected). For the model itself use
    `megacoca.load`; for a model directory, `megacoca convert from-deepspeed` (megacoca.checkpoint.export): both
    stream."""
    return {name: tensor.float() for name, tensor in iter_consolidated(path)}
