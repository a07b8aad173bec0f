"""Save and resume training state through DeepSpeed's checkpoints, crash-safe.

Layout under `checkpoint_dir`:

    step00000040/              DeepSpeed's files (model, ZeRO optimizer shards, zero_to_fp32.py)
        megacoca_rank00001.pt  per-rank client state: data position (the loader's state_dict), RNG states
        COMPLETE               written by rank 0 only after every rank returned from save_checkpoint
    latest                     tag of the newest COMPLETE checkpoint (atomic rename), what zero_to_fp32 reads

DeepSpeed's own client state (in the dp-rank-0 model file of each model-parallel rank) carries the step, the
dp size, the resolved job config and the tensor-parallel layout (how to merge the TP ranks' shards). DeepSpeed writes its `latest` from rank 0 before the other ranks have finished, so megacoca
saves with `save_latest=False` and writes the marker and `latest` itself after a barrier: a crash mid-save
leaves a tag without COMPLETE, which `--resume auto` ignores, and the previous checkpoint stays intact.
"""

from __future__ import annotations

import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"
LATEST = "latest"
TAG_PATTERN = re.compile(r"^step(\d+)$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _rank_file(tag_dir: str, rank: int) -> str:
    return os.path.join(tag_dir, f"megacoca_rank{rank:05d}.pt")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_checkpoints(checkpoint_dir: str) -> list[tuple[int, str]]:
    """(step, tag directory) of every COMPLETE checkpoint, oldest first."""
    if not os.path.isdir(checkpoint_dir):
        return []
    found = []
    for name in os.listdir(checkpoint_dir):
        match = TAG_PATTERN.match(name)
        path = os.path.join(checkpoint_dir, name)
        if match and os.path.isfile(os.path.join(path, COMPLETE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_resume_checkpoint(job) -> str | None:
    """The tag directory `checkpoint.resume` names: None for "none" (or "auto" with nothing complete)."""
    resume = job.checkpoint.resume
    if resume in ("", "none", None):
        return None
    if resume == "auto":
        found = complete_checkpoints(job.checkpoint_dir)
        return found[-1][1] if found else None
    path = resume.rstrip("/")
    if os.path.isfile(os.path.join(path, LATEST)) and not os.path.isfile(os.path.join(path, COMPLETE)):
        with open(os.path.join(path, LATEST)) as f:
            path = os.path.join(path, f.read().strip())
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint.resume: no checkpoint directory {resume}")
    if not os.path.isfile(os.path.join(path, COMPLETE)):
        raise FileNotFoundError(f"checkpoint.resume: {path} is incomplete (no {COMPLETE} marker: a save was "
                                "interrupted); pick an older one or use --resume auto")
    return path


def pipeline_layout(module, job) -> dict | None:
    """Under pipeline parallelism, what consolidation needs: {"pp", "tp", "stage", "vision_blocks"}; else None."""
    if not hasattr(module, "block_indices"):
        return None
    return {"pp": module.pp, "tp": job.parallel.tp, "stage": module.stage, "vision_blocks": list(module.block_indices)}


def save_checkpoint(engine, job, step: int, train_loader=None, *, dp_size: int) -> str:
    """Every rank calls this. Returns the tag directory."""
    checkpoint_dir = job.checkpoint_dir
    tag = tag_for(step)
    from megacoca.parallel.tensor import tensor_parallel_layout

    client_state = {"step": step, "dp_size": dp_size, "config": job.to_dict(),
                    "tensor_parallel": tensor_parallel_layout(engine.module),
                    "pipeline": pipeline_layout(engine.module, job)}
    engine.save_checkpoint(checkpoint_dir, tag=tag, client_state=client_state, save_latest=False)
    tag_dir = os.path.join(checkpoint_dir, tag)
    rank = dist.get_rank()
    os.makedirs(tag_dir, exist_ok=True)
    local = {"step": step, "rng": rng_state(),
             "data": train_loader.state_dict() if hasattr(train_loader, "state_dict") else None}
    tmp = _rank_file(tag_dir, rank) + ".tmp"
    torch.save(local, tmp)
    os.replace(tmp, _rank_file(tag_dir, rank))
    dist.barrier()  # every rank's DeepSpeed files and client file are on disk
    if rank == 0:
        with open(os.path.join(tag_dir, COMPLETE), "w") as f:
            f.write(f"{step}\n")
        tmp = os.path.join(checkpoint_dir, LATEST + ".tmp")
        with open(tmp, "w") as f:
            f.write(tag)
        os.replace(tmp, os.path.join(checkpoint_dir, LATEST))
        prune(checkpoint_dir, job.checkpoint.keep, newest_step=step)
    dist.barrier()
    return tag_dir


def prune(checkpoint_dir: str, keep: int, newest_step: int) -> None:
    """Delete complete checkpoints beyond the newest `keep`, and incomplete ones older than the newest."""
    complete = complete_checkpoints(checkpoint_dir)
    doomed = [path for _, path in complete[:-keep]] if keep else []
    for name in os.listdir(checkpoint_dir):
        match = TAG_PATTERN.match(name)
        path = os.path.join(checkpoint_dir, name)
        if match and int(match.group(1)) < newest_step and not os.path.isfile(os.path.join(path, COMPLETE)):
            doomed.append(path)
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(engine, tag_dir: str, train_loader=None, *, dp_size: int) -> dict:
    """Every rank calls this; restores engine (model, optimizer, lr schedule), data position and RNG."""
    checkpoint_dir, tag = os.path.split(tag_dir.rstrip("/"))
    load_path, client_state = engine.load_checkpoint(checkpoint_dir, tag=tag)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {tag_dir}")
    client_state = client_state or {}
    rank = dist.get_rank()
    rank_file = _rank_file(tag_dir, rank)
    saved_dp = client_state.get("dp_size")
    if saved_dp != dp_size or not os.path.isfile(rank_file):
        raise RuntimeError(f"checkpoint {tag_dir} was saved with dp={saved_dp}; this run has dp={dp_size}: exact "
                           "resume (data position, RNG) needs the same data-parallel size")
    local = torch.load(rank_file, map_location="cpu", weights_only=False)
    if local.get("data") is not None and hasattr(train_loader, "load_state_dict"):
        train_loader.load_state_dict(local["data"])
    set_rng_state(local["rng"])
    return {"step": int(client_state.get("step", local["step"])), "config": client_state.get("config")}
