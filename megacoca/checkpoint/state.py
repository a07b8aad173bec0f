"""Save and resume training state through DeepSpeed's checkpoints, crash-safe.

Layout under `checkpoint_dir`:

    step00000040/              DeepSpeed's files (model, ZeRO optimizer shards, zero_to_fp32.py)
        megacoca_rank00001.pt  per-rank client state, tensors and plain data only: data position (the loader's
                               state_dict), RNG states
        COMPLETE               written by rank 0 only after every rank's files are on disk
    latest                     tag of the newest COMPLETE checkpoint (atomic rename), what zero_to_fp32 reads

DeepSpeed's own client state (in the dp-rank-0 model file of each model-parallel rank) carries the step, the
resolved job config and what megacoca.checkpoint.tags.client_record writes: the run's layout record, the
tensor-parallel shard map (how to merge the TP ranks' shards) and the pipeline stage. Tag names, COMPLETE and
`latest`, rank files, RNG state and finding a tag are megacoca.checkpoint.tags.

A save, in order (the names are megacoca.launch.faults points, where tests kill a rank or fill the disk):
rank 0 removes any earlier files of the same tag (a partial save, or a complete one being written again: its
COMPLETE marker goes first), then save:begin; DeepSpeed writes its files (save:after_model_states,
save:after_optim_states) with `save_latest=False`, since DeepSpeed writes its `latest` from rank 0 before the
other ranks have finished; every rank writes its megacoca file (save:after_rank_file); the ranks agree that
every write succeeded; rank 0 writes COMPLETE (save:before_complete, save:after_complete), then `latest`
(save:after_latest), then prunes. A process killed anywhere before COMPLETE leaves a tag without it, which
`--resume auto` never chooses (Trainer.resume reports it) and the next save removes; the previous checkpoint is
untouched. A write that fails (full disk, read-only directory) on any rank stops every rank at the agreement
with the same one-line CheckpointError; the partial tag is removed and the previous checkpoint is untouched.

Durable: COMPLETE vouches only for what is on the device. Each file DeepSpeed writes is fsynced on a worker thread
as soon as it is written (the disk writes while the next file is serialised); a rank's own file is written to a
temporary name, fsynced and renamed; before the ranks agree, each waits for its fsyncs and fsyncs the directories it
made, the tag directory and the checkpoint directory. COMPLETE and `latest` are written the same way (temporary
file fsynced, renamed, directory fsynced). A power loss or node crash can then leave a tag without COMPLETE, never a
COMPLETE tag with an empty or cut file. For what the disk may still do wrong, `resume_checkpoint` verifies the tag
it picks and, under `resume=auto`, falls back to the previous complete checkpoint with one line.

Loading never unpickles code (megacoca.checkpoint.files): before DeepSpeed reads anything, the ranks check
every file of the tag between them (weights_only, mmap: no tensor bytes read) and agree; DeepSpeed's own loads
then go through the guarded checkpoint engine, `weights_only=True` as well.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from megacoca.checkpoint.files import (
    BadCheckpointError,
    CheckpointError,
    UnsafeCheckpointError,
    checkpoint_files,
    describe_write_error,
    fsync_path,
    guard,
    remove_tree,
    safe_load,
    verify_files,
    write_durably,
)
from megacoca.checkpoint.reshape import is_layout_free, load_reshaped, needs_reshape
from megacoca.checkpoint.tags import (
    COMPLETE,
    LATEST,
    IncompleteTagError,
    MissingTagError,
    TagFiles,
    check_complete,
    client_record,
    complete_checkpoints,
    incomplete_checkpoints,
    rank_file,
    resolve_tag,
    rng_state,
    set_rng_state,
    tag_for,
)
from megacoca.config.layout import Layout
from megacoca.launch import faults


def find_resume_checkpoint(job) -> str | None:
    """The tag directory `checkpoint.resume` names: None for "none" (or "auto" with nothing complete)."""
    resume = job.checkpoint.resume
    if resume in ("", "none", None):
        return None
    if resume == "auto":
        found = complete_checkpoints(job.checkpoint_dir)
        return found[-1][1] if found else None
    try:
        return resolve_tag(resume)
    except MissingTagError:
        raise FileNotFoundError(f"checkpoint.resume: no checkpoint directory {resume}") from None
    except IncompleteTagError as error:
        raise FileNotFoundError(f"checkpoint.resume: {error.tag_dir} is incomplete (no {COMPLETE} marker: a save "
                                "was interrupted); pick an older one or use --resume auto") from None


def optimizer_param_names(engine) -> list[list[str]] | None:
    """Per param group, the names of the parameters a client torch optimizer holds (ZeRO-0: DeepSpeed saves its
    state dict keyed by position, megacoca.checkpoint.full_state reads it by name); None for DeepSpeed's own
    optimizers, whose groups are flat partitions."""
    names = {id(param): name for name, param in engine.module.named_parameters()}
    groups = getattr(engine.optimizer, "param_groups", None) or []
    if type(engine.optimizer).__module__.startswith("deepspeed") or not groups:
        return None
    try:
        return [[names[id(param)] for param in group["params"]] for group in groups]
    except KeyError:
        return None


def _failures(failure) -> list[tuple[int, object]]:
    """Collective: (rank, failure) of every rank whose `failure` is not None (a message, or a tuple)."""
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, failure)
    return [(rank, value) for rank, value in enumerate(everyone) if value is not None]


def _write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    write_durably(path, write)


def _clear_tag(tag_dir: str, rank: int) -> str | None:
    """Rank 0 removes any earlier files of the tag (COMPLETE first); the failure, described, or None."""
    try:
        if rank == 0 and os.path.isdir(tag_dir):
            remove_tree(tag_dir, COMPLETE)
        faults.point("save:begin")
    except OSError as error:
        return f"{error.strerror or error} clearing {tag_dir}"
    return None


def _write_rank_file(tag_dir: str, rank: int, step: int, train_loader) -> str | None:
    """This rank's megacoca file (data position, RNG state); the failure, described, or None."""
    path = rank_file(tag_dir, rank)
    try:
        local = {"step": step, "rng": rng_state(),
                 "data": train_loader.state_dict() if hasattr(train_loader, "state_dict") else None}
        write_durably(path, lambda tmp: torch.save(local, tmp))
        faults.point("save:after_rank_file")
    except (OSError, RuntimeError) as exc:
        return describe_write_error(exc, path)
    return None


def _sync_written(files, tag_dir: str) -> tuple[str | None, float]:
    """Wait for the fsyncs of every file this rank wrote in the save (started as each was written: `files` is the
    GuardedCheckpointEngine), then fsync the directories it made, the tag directory and the directory that holds
    it (their entries): (the failure, described, or None; the seconds it waited)."""
    began = time.perf_counter()
    try:
        files.wait_synced()
        made = [path for path in files.written if os.path.isdir(path)]
        for path in dict.fromkeys([*made, tag_dir, os.path.dirname(tag_dir.rstrip("/"))]):
            if os.path.exists(path):
                fsync_path(path)
    except OSError as exc:
        return f"{exc.strerror or exc} syncing {exc.filename or tag_dir} to disk", time.perf_counter() - began
    return None, time.perf_counter() - began


def _mark_complete(job, step: int, tag_dir: str) -> str | None:
    """Rank 0, once every rank's files are on disk: COMPLETE, then `latest`, then pruning; the failure or None."""
    checkpoint_dir = job.checkpoint_dir
    try:
        faults.point("save:before_complete")
        _write_text(os.path.join(tag_dir, COMPLETE), f"{step}\n")
        faults.point("save:after_complete")
        _write_text(os.path.join(checkpoint_dir, LATEST), os.path.basename(tag_dir))
        faults.point("save:after_latest")
        prune(checkpoint_dir, job.checkpoint.keep, newest_step=step)
    except OSError as exc:
        return f"{exc.strerror or exc} writing {exc.filename or checkpoint_dir}"
    return None


def _raise_failed(failed: list, step: int, tag_dir: str, rank: int) -> None:
    """Every rank: the one-line CheckpointError of a failed save, after rank 0 removed a partial tag."""
    complete = os.path.isfile(os.path.join(tag_dir, COMPLETE))
    if rank == 0 and not complete:
        remove_tree(tag_dir, COMPLETE)  # a partial save only takes space (on a full disk, needed space)
    previous = [s for s, _ in complete_checkpoints(os.path.dirname(tag_dir)) if s != step]
    kept = (f"step {step} is complete but `latest` may be stale" if complete else
            f"the previous complete checkpoint (step {previous[-1]}) is intact" if previous else
            "there is no earlier complete checkpoint")
    first_rank, message = failed[0]
    more = f" (and on {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
    raise CheckpointError(f"checkpoint save of step {step} failed on rank {first_rank}: {message}{more}; {kept}")


def save_checkpoint(engine, job, step: int, train_loader=None, *, layout: Layout) -> str:
    """Every rank calls this; `layout` is the run's (recorded in the client state). Returns the tag directory;
    raises CheckpointError on every rank if a write failed on any (the previous complete checkpoint is
    untouched)."""
    # heavy (deepspeed), and only needed when saving
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    from megacoca.checkpoint.universal import universal_checkpoint_info

    checkpoint_dir = job.checkpoint_dir
    tag = tag_for(step)
    tag_dir = os.path.join(checkpoint_dir, tag)
    rank = dist.get_rank()
    files = guard(engine)
    files.begin_save(_clear_tag(tag_dir, rank))
    dist.barrier()  # the tag is gone on disk before any rank writes into it
    client_state = {"step": step, "config": job.to_dict(), **client_record(engine.module, layout),
                    "optimizer_param_names": optimizer_param_names(engine),
                    UNIVERSAL_CHECKPOINT_INFO: universal_checkpoint_info(engine.module)}  # for ds_to_universal
    engine.save_checkpoint(checkpoint_dir, tag=tag, client_state=client_state, save_latest=False)
    error = files.error
    if error is None:
        error = _write_rank_file(tag_dir, rank, step, train_loader)
    if error is None:  # before COMPLETE vouches for them: every file this rank wrote is on the device
        error, files.fsync_s = _sync_written(files, tag_dir)
    failed = _failures(error)  # every rank's DeepSpeed files and client file are on disk, or every rank raises
    if not failed and rank == 0:
        error = _mark_complete(job, step, tag_dir)
    failed = failed or _failures(error)
    if failed:
        _raise_failed(failed, step, tag_dir, rank)
    return tag_dir


def prune(checkpoint_dir: str, keep: int, newest_step: int) -> None:
    """Delete complete checkpoints beyond the newest `keep`, and incomplete ones older than the newest. Each loses
    its COMPLETE marker before its files, so a kill midway leaves an incomplete tag, never a broken complete one."""
    doomed = [path for _, path in complete_checkpoints(checkpoint_dir)[:-keep]] if keep else []
    doomed += [path for step, path in incomplete_checkpoints(checkpoint_dir) if step < newest_step]
    for path in doomed:
        remove_tree(path, COMPLETE)


def check_resumable(tag_dir: str) -> TagFiles:
    """The tag's files (`.layout`: the checkpoint's), after checking (BadCheckpointError, one line naming the file,
    the same on every rank: they read the same files) that the tag holds every file of that layout, including
    each of its ranks' megacoca file. Its layout need not be this run's: another one is resumed through
    megacoca.checkpoint.reshape."""
    files = check_complete(tag_dir)
    for rank in range(files.layout.world):
        if not os.path.isfile(rank_file(tag_dir, rank)):
            raise BadCheckpointError(f"resume from {tag_dir}: it is incomplete: {rank_file(tag_dir, rank)} (rank "
                                     f"{rank}'s data position and RNG state) is missing")
    return files


def _verify_between_ranks(tag_dir: str, rank: int, world: int) -> None:
    """Every file of the tag loadable as tensors and plain data, each read by one rank; the first failure raised
    on every rank (UnsafeCheckpointError or BadCheckpointError, naming the tag)."""
    failure = None
    try:
        verify_files(checkpoint_files(tag_dir)[rank::world])  # each file read by one rank
    except BadCheckpointError as error:
        failure = (isinstance(error, UnsafeCheckpointError), str(error))
    failed = _failures(failure)
    if failed:
        unsafe, message = failed[0][1]
        raise (UnsafeCheckpointError if unsafe else BadCheckpointError)(f"resume from {tag_dir}: {message}")


def verify_checkpoint(tag_dir: str) -> None:
    """Collective: the tag holds every file of its layout (`check_resumable`; a layout-free one is not checked for
    rank files) and every file reads as tensors and plain data (each checked by one rank, mmap: a file cut short,
    as a power loss can leave one, fails here). Raises the same BadCheckpointError / UnsafeCheckpointError on
    every rank."""
    failure = None
    try:
        if not is_layout_free(tag_dir):
            check_resumable(tag_dir)
    except BadCheckpointError as error:
        failure = (False, str(error))
    failed = _failures(failure)
    if failed:
        raise BadCheckpointError(failed[0][1][1])
    _verify_between_ranks(tag_dir, dist.get_rank(), dist.get_world_size())


def resume_checkpoint(job, say=print) -> str | None:
    """Collective: the tag directory to resume from, verified (`verify_checkpoint`). `checkpoint.resume=auto`:
    the newest complete checkpoint; when it fails verification (a file truncated by a power loss after COMPLETE
    was written, say), `say` gets one line and the previous complete one is tried, and so on. A checkpoint the user
    named is never replaced by another: its failure is raised. An unsafe file (a pickle that would run code) is
    always raised: that is not damage to recover from silently."""
    target = find_resume_checkpoint(job)
    if target is None:
        return None
    if job.checkpoint.resume != "auto":
        verify_checkpoint(target)
        return target
    candidates = [path for _, path in complete_checkpoints(job.checkpoint_dir)][::-1]
    for index, tag_dir in enumerate(candidates):
        try:
            verify_checkpoint(tag_dir)
            return tag_dir
        except UnsafeCheckpointError:
            raise
        except BadCheckpointError as error:
            if index + 1 == len(candidates):
                raise
            say(f"resume auto: {tag_dir} fails verification ({' '.join(str(error).split())}); falling back to the "
                f"previous complete checkpoint, {candidates[index + 1]}")
    return None


def load_checkpoint(engine, tag_dir: str, train_loader=None, *, layout: Layout) -> dict:
    """Every rank calls this, in a run of `layout`; restores engine (model, optimizer, lr schedule), data position
    and RNG. Raises BadCheckpointError on every rank, before DeepSpeed reads anything, if the tag lacks a file of
    its layout (`check_resumable`), and UnsafeCheckpointError if any file of the tag holds more than tensors and
    plain data. A checkpoint of another layout or ZeRO stage, or a layout-free one (`megacoca convert reshape`),
    is reshaped into this one (megacoca.checkpoint.reshape); the result's "reshaped" then says from what to
    what."""
    checkpoint_dir, tag = os.path.split(tag_dir.rstrip("/"))
    rank, world = dist.get_rank(), dist.get_world_size()
    files = None if is_layout_free(tag_dir) else check_resumable(tag_dir)
    if needs_reshape(tag_dir, layout, files):
        return load_reshaped(engine, tag_dir, train_loader, layout=layout)
    _verify_between_ranks(tag_dir, rank, world)
    guard(engine)
    load_path, client_state = engine.load_checkpoint(checkpoint_dir, tag=tag)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {tag_dir}")
    client_state = client_state or {}
    local = safe_load(rank_file(tag_dir, rank))
    if local.get("data") is not None and hasattr(train_loader, "load_state_dict"):
        train_loader.load_state_dict(local["data"])
    set_rng_state(local["rng"])
    return {"step": int(client_state.get("step", local["step"])), "config": client_state.get("config")}
