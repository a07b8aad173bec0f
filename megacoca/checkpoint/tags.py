"""The floor of megacoca.checkpoint: what a checkpoint directory is, for every other module of the package.

    <checkpoint_dir>/step00000040/   one tag (`tag_for`, TAG_PATTERN)
        mp_rank_00_model_states.pt   DeepSpeed's files (`TagFiles` names them: model states per model-parallel
        *zero_pp_rank_0_mp_rank_00_optim_states.pt   rank, and per data-parallel rank under ZeRO-3; optimizer
                                                      partitions per data-parallel rank)
        megacoca_rank00001.pt        each rank's data position and RNG state (`rank_file`, `rng_state`)
        COMPLETE                     the save finished on every rank
    <checkpoint_dir>/latest          the newest complete tag's name

Owned here: tag names; COMPLETE and `latest`; listing the complete and incomplete tags; `resolve_tag`, the one
way from a path (a tag directory, or a checkpoint directory whose `latest` names one) to a complete tag; the
per-rank files; RNG state; and the layout record. The layout is megacoca.config.layout.Layout, the one type:
a save records `layout.record()` in DeepSpeed's client state (with the tensor-parallel shard map and, under a
pipeline, the stage's index and ViT blocks: `client_record`), and `read_tag_files` reads it back, from checkpoints
written before that record too (their `pipeline`, `tensor_parallel` and `dp_size` keys, or DeepSpeed's own). What
a tag's files are (names per rank, DeepSpeed's bf16-optimizer prefix) is `TagFiles`: the files, not a layout.
"""

from __future__ import annotations

import glob
import os
import random
import re
from dataclasses import dataclass

import numpy as np
import torch

from megacoca.checkpoint.files import BadCheckpointError, checkpoint_files, safe_load, verify_files
from megacoca.config.layout import Layout

COMPLETE = "COMPLETE"
LATEST = "latest"
TAG_PATTERN = re.compile(r"^step(\d+)$")
CLIENT_KEYS = ("step", "layout", "pipeline_stage", "config", "tensor_parallel", "dp_size", "pipeline")
_OPTIM = re.compile(r"^(?P<prefix>.*?)zero_pp_rank_(?P<dp>\d+)_mp_rank_(?P<mp>\d+)_optim_states\.pt$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rank_file(tag_dir: str, rank: int) -> str:
    """Rank `rank`'s megacoca file in `tag_dir`: its data position and RNG state."""
    return os.path.join(tag_dir, f"megacoca_rank{rank:05d}.pt")


# ---- RNG ------------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states as tensors and plain data (a weights_only load reads them)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)  # else np.random.get_state() itself, as files before the dict held it
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- tags -----------------------------------------------------------------------------------------------------
def _tags(checkpoint_dir: str) -> list[tuple[int, str, bool]]:
    """(step, tag directory, complete) of every step* directory, oldest first."""
    if not os.path.isdir(checkpoint_dir):
        return []
    found = []
    for name in os.listdir(checkpoint_dir):
        match = TAG_PATTERN.match(name)
        path = os.path.join(checkpoint_dir, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path, os.path.isfile(os.path.join(path, COMPLETE))))
    return sorted(found)


def complete_checkpoints(checkpoint_dir: str) -> list[tuple[int, str]]:
    """(step, tag directory) of every COMPLETE checkpoint, oldest first."""
    return [(step, path) for step, path, complete in _tags(checkpoint_dir) if complete]


def incomplete_checkpoints(checkpoint_dir: str) -> list[tuple[int, str]]:
    """(step, tag directory) of every tag without COMPLETE (its save was interrupted), oldest first."""
    return [(step, path) for step, path, complete in _tags(checkpoint_dir) if not complete]


class MissingTagError(FileNotFoundError):
    """`resolve_tag`: no directory where the path (or its `latest`) points; `tag_dir` is where it looked."""

    def __init__(self, tag_dir: str) -> None:
        super().__init__(f"no checkpoint directory {tag_dir}")
        self.tag_dir = tag_dir


class IncompleteTagError(FileNotFoundError):
    """`resolve_tag`: the tag directory `tag_dir` has no COMPLETE marker (its save was interrupted)."""

    def __init__(self, tag_dir: str) -> None:
        super().__init__(f"{tag_dir} has no {COMPLETE} marker: the save was interrupted")
        self.tag_dir = tag_dir


def resolve_tag(path: str) -> str:
    """The complete tag directory `path` names: `path` itself, or, for a checkpoint directory (a `latest` and no
    COMPLETE of its own), the tag its `latest` names. MissingTagError / IncompleteTagError (FileNotFoundError,
    one line) otherwise. Only the marker is checked, not the files (`locate_tag`)."""
    path = path.rstrip("/") or "/"
    if os.path.isfile(os.path.join(path, LATEST)) and not os.path.isfile(os.path.join(path, COMPLETE)):
        with open(os.path.join(path, LATEST)) as f:
            path = os.path.join(path, f.read().strip())
    if not os.path.isdir(path):
        raise MissingTagError(path)
    if not os.path.isfile(os.path.join(path, COMPLETE)):
        raise IncompleteTagError(path)
    return path


# ---- the files of a tag and its layout -------------------------------------------------------------------------
@dataclass(frozen=True)
class TagFiles:
    """The DeepSpeed files a tag holds for its `layout` (pp x tp model-parallel ranks, each with dp data-parallel
    ranks). `zero`: the fp32 master weights are in per-data-parallel-rank optimizer files (ZeRO-1/2/3, DeepSpeed's
    bf16 optimizer), else (ZeRO-0) in each model-parallel rank's module; `zero3`: the model states are per
    data-parallel rank too; `optim_prefix`: the optimizer files' prefix (DeepSpeed's bf16 optimizer: "bf16_")."""

    layout: Layout
    zero: bool
    zero3: bool
    optim_prefix: str = ""

    @property
    def mp(self) -> int:
        return self.layout.pp * self.layout.tp

    def model_states(self, mp_rank: int) -> list[str]:
        if self.zero3:
            return [f"zero_pp_rank_{d}_mp_rank_{mp_rank:02d}_model_states.pt" for d in range(self.layout.dp)]
        return [f"mp_rank_{mp_rank:02d}_model_states.pt"]

    def optim_states(self, mp_rank: int) -> list[str]:
        if not self.zero:
            return []
        return [f"{self.optim_prefix}zero_pp_rank_{d}_mp_rank_{mp_rank:02d}_optim_states.pt"
                for d in range(self.layout.dp)]


def describe_ranks(layout: Layout) -> str:
    """`dp=2 x pp=1 x tp=2`: the ranks that wrote a checkpoint (Layout.degrees() adds the ZeRO stage)."""
    return f"dp={layout.dp} x pp={layout.pp} x tp={layout.tp}"


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


def _unrecorded_layout(state: dict, zero: bool, zero3: bool) -> Layout:
    """The layout of a checkpoint written before megacoca recorded one: megacoca's old keys (`pipeline`,
    `tensor_parallel`, `dp_size`), else DeepSpeed's own (`checkpoint_parallel_dimensions`, `dp_world_size`,
    `ds_config`). The ZeRO stage: 0 without optimizer partitions, 3 with per-rank model states, else the stage
    DeepSpeed's config asked for (the one its optimizer partitions record)."""
    dims = state.get("checkpoint_parallel_dimensions") or {}
    pipeline = state.get("pipeline") or {}
    tp = pipeline.get("tp") or (state.get("tensor_parallel") or {}).get("size") or dims.get("tp_degree") or 1
    pp = pipeline.get("pp") or dims.get("pp_degree") or 1
    dp = state.get("dp_world_size") or state.get("dp_size") or 1
    ds_config = state.get("ds_config") if isinstance(state.get("ds_config"), dict) else {}
    stage = 0 if not zero else 3 if zero3 else int((ds_config.get("zero_optimization") or {}).get("stage") or 1)
    precision = "bf16" if (ds_config.get("bf16") or {}).get("enabled") else "fp32"
    return Layout(dp=int(dp), tp=int(tp), pp=int(pp), zero_stage=stage, precision=precision)


def read_tag_files(tag_dir: str) -> TagFiles:
    """The tag's files and layout, from the first model-states file (its client state's layout record, or what
    checkpoints written before it hold: `_unrecorded_layout`) and the names in the directory."""
    first = _first_model_states(tag_dir)
    state = safe_load(first, mmap=True)
    # ZeRO-0 keeps its optimizer (with the weights) in the model-states file; otherwise the fp32 masters are in
    # the optimizer partition files.
    zero = "optimizer" in state and state["optimizer"] is None
    prefixes = sorted({match.group("prefix") for match in map(_OPTIM.match, os.listdir(tag_dir)) if match})
    zero = zero or bool(prefixes)
    zero3 = os.path.basename(first).startswith("zero_pp_rank_")
    record = state.get("layout")
    layout = Layout.from_record(record) if isinstance(record, dict) else _unrecorded_layout(state, zero, zero3)
    return TagFiles(layout, zero=zero, zero3=zero3, optim_prefix=prefixes[0] if prefixes else "")


def missing_files(tag_dir: str, files: TagFiles) -> list[str]:
    """Every file the layout implies that is not in `tag_dir` (model states, optimizer partitions), in rank order."""
    missing = []
    for mp_rank in range(files.mp):
        for name in files.model_states(mp_rank) + files.optim_states(mp_rank):
            if not os.path.isfile(os.path.join(tag_dir, name)):
                missing.append(os.path.join(tag_dir, name))
    return missing


def check_complete(tag_dir: str) -> TagFiles:
    """The tag's files, after checking that every file its layout implies is there; BadCheckpointError names the
    first one missing."""
    files = read_tag_files(tag_dir)
    missing = missing_files(tag_dir, files)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise BadCheckpointError(f"{tag_dir} is incomplete: {missing[0]} is missing{more}; the checkpoint was "
                                 f"written by {describe_ranks(files.layout)} ranks")
    return files


def locate_tag(path: str) -> tuple[str, TagFiles]:
    """(tag directory, its files) of a checkpoint or tag directory: COMPLETE (`resolve_tag`), and every file of its
    layout there (what the CLI checks while parsing arguments; `open_tag` also checks every file's contents, once,
    when the checkpoint is read)."""
    tag_dir = resolve_tag(path)
    return tag_dir, check_complete(tag_dir)


def open_tag(path: str) -> tuple[str, TagFiles]:
    """(tag directory, its files) of a checkpoint or tag directory, checked as `locate_tag` says and every file
    loadable as tensors and plain data (megacoca.checkpoint.files): before anything (DeepSpeed's zero_to_fp32 too)
    unpickles one."""
    tag_dir, files = locate_tag(path)
    verify_files(checkpoint_files(tag_dir))
    return tag_dir, files


# ---- the client state ------------------------------------------------------------------------------------------
def tensor_parallel_shard_map(module: torch.nn.Module) -> dict | None:
    """How to merge the tensor-parallel ranks' state dicts back into the single-device one (each parameter's
    `tp_shard`): {"size": tp, "params": {name: {"dim", "full_shape", "padded"}}}, every name of a shared parameter
    listed; None when nothing is sharded."""
    params = {}
    size = 1
    for name, param in module.named_parameters(remove_duplicate=False):
        shard = getattr(param, "tp_shard", None)
        if shard is not None:
            size = shard.size
            params[name] = {"dim": shard.dim, "full_shape": list(shard.full_shape), "padded": shard.padded}
    return {"size": size, "params": params} if params else None


def pipeline_stage_record(module: torch.nn.Module) -> dict | None:
    """Under pipeline parallelism, this rank's stage: {"stage", "vision_blocks"}; else None."""
    if not hasattr(module, "block_indices"):
        return None
    return {"stage": module.stage, "vision_blocks": list(module.block_indices)}


def client_record(module: torch.nn.Module, layout: Layout) -> dict:
    """What every save records about its layout in DeepSpeed's client state: `layout` (Layout.record()), the
    tensor-parallel shard map under `tensor_parallel` (the key checkpoints have always used), and the pipeline
    stage."""
    return {"layout": layout.record(), "tensor_parallel": tensor_parallel_shard_map(module),
            "pipeline_stage": pipeline_stage_record(module)}


def client_state(tag_dir: str, mp_rank: int = 0) -> dict:
    """DeepSpeed's client state (step, the run's job config, the layout record, the tensor-parallel shard map of
    that rank's stage; older checkpoints' `dp_size` and `pipeline`) from the first model-states file of
    model-parallel rank `mp_rank`."""
    files = sorted(glob.glob(os.path.join(tag_dir, f"*mp_rank_{mp_rank:02d}_model_states.pt")))
    if not files:
        return {}
    state = safe_load(files[0], mmap=True)
    return {key: state[key] for key in CLIENT_KEYS if key in state}
