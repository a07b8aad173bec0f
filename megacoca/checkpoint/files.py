"""Checkpoint files read without unpickling code, and written so that a failed write stops every rank together.

Reading: a `.pt` file is a pickle, and a pickle can run any code when it is loaded; a checkpoint may come from
anywhere (a colleague, a download). `safe_load` is `torch.load(weights_only=True)`: tensors, plain containers
and numbers, and the few classes DeepSpeed's ZeRO optimizer files hold (ALLOWED_GLOBALS, plain data classes
that run no code when rebuilt). Anything else is refused with an `UnsafeCheckpointError` naming the file and
the type. Every loader in megacoca goes through it: resume (megacoca's rank files, and DeepSpeed's own loads
through `GuardedCheckpointEngine`), consolidation, eval and convert. DeepSpeed's zero_to_fp32 loads with
`weights_only=False` itself, so consolidation first checks every file of the tag with `verify_files`.

Writing: DeepSpeed writes its files between collectives (a barrier before, one after). A rank whose write fails
(full disk, read-only or vanished directory) and raises there leaves the other ranks waiting in that barrier
forever. `GuardedCheckpointEngine` records the first failed write instead and skips this rank's later writes of
the save, so every rank comes out of DeepSpeed's save; megacoca's `save_checkpoint` then agrees on the errors
(one collective) and raises the same one-line `CheckpointError` on every rank.
"""

from __future__ import annotations

import glob
import os
import pickle
import re
import shutil
import uuid

import numpy as np
import torch

from megacoca.config.train import ConfigError
from megacoca.launch import faults


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (or read); the message is one line. `exit_code`: the process's."""

    exit_code = 1


class BadCheckpointError(CheckpointError, ConfigError):
    """A checkpoint file that cannot be read (truncated, not a torch file): bad input, so also a ConfigError
    (the CLI prints its one line and exits with code 2)."""

    exit_code = 2


class UnsafeCheckpointError(BadCheckpointError):
    """A checkpoint file holds something other than tensors and plain data (a pickle that could run code)."""


def _deepspeed_globals() -> list:
    """The classes DeepSpeed's ZeRO optimizer-state files pickle (seen in ZeRO 1/2/3, bf16/fp32, offload)."""
    try:  # DeepSpeed is not needed to read a consolidated model (megacoca.load on a machine without it)
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _numpy_rng_globals() -> list:
    """numpy's RNG state as megacoca rank files before the tensor-only format held it (an array of uint32)."""
    multiarray = getattr(np, "_core", None) or np.core
    return [multiarray.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def allowed_globals() -> list:
    """Beyond what `weights_only=True` allows by default (tensors, containers, numbers, torch.Size, dtypes)."""
    return _deepspeed_globals() + _numpy_rng_globals()


def _reason(error: Exception) -> str:
    """One line from torch's multi-line weights_only refusal."""
    text = str(error)
    found = re.search(r"GLOBAL (\S+)", text)
    if found:
        return (f"it holds {found.group(1)}, which is not a tensor or plain data (loading it would let the "
                "file run code)")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Weights only load failed", "Check the documentation",
                                                              "Please file an issue", "In PyTorch"))]
    return (useful or lines or ["unreadable"])[-1].rstrip(".")


def safe_load(path: str, map_location="cpu", *, mmap: bool = False):
    """torch.load(path, weights_only=True) with ALLOWED_GLOBALS; one-line errors naming the file."""
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(f"refused to load {path}: {_reason(error)}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        if mmap and "mmap" in str(error):  # a file in torch's legacy (non-zip) format: read it whole
            return safe_load(path, map_location)
        raise BadCheckpointError(f"cannot read {path}: {_reason(error)}") from None


def verify_files(paths) -> None:
    """Load each file as `safe_load` would, without reading the tensors' bytes (mmap): raises at the first
    file that holds anything but tensors and plain data."""
    for path in paths:
        safe_load(path, mmap=True)


def checkpoint_files(tag_dir: str) -> list[str]:
    """Every torch file of a tag directory (DeepSpeed's, megacoca's), sorted."""
    return sorted(glob.glob(os.path.join(tag_dir, "**", "*.pt"), recursive=True))


def describe_write_error(error: BaseException, path: str) -> str:
    """One line: what went wrong writing `path`. torch.save to a path reports a full disk as "unexpected pos"
    (its zip writer's check), so without an OSError in the chain the directory is probed with a small write."""
    seen = error
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__cause__ or seen.__context__
    if seen is None:
        seen = _probe_write(os.path.dirname(path) or ".")
    if seen is not None:
        return f"{seen.strerror or seen} writing {seen.filename or path}"
    first = (str(error).strip().splitlines() or [type(error).__name__])[-1]
    return f"writing {path} failed: {first}"


def _probe_write(directory: str, size: int = 1 << 16) -> OSError | None:
    """The OSError a small write into `directory` raises, or None if it succeeds."""
    probe = os.path.join(directory, f".megacoca_probe_{uuid.uuid4().hex}")
    try:
        with open(probe, "wb") as handle:
            handle.write(b"\0" * size)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        return error
    finally:
        try:
            os.remove(probe)
        except OSError:
            pass
    return None


def fsync_path(path: str) -> None:
    """Flush a file's or a directory's data and metadata to the device (a directory: the names it holds), so a
    power loss or a node crash cannot leave it empty or missing after something that vouches for it is written."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: str, write) -> None:
    """`write(tmp_path)`, then the temporary file fsynced, renamed to `path`, and its directory fsynced: after
    this returns, `path` holds the whole content even across a power loss, and before it, the old content."""
    tmp = path + ".tmp"
    write(tmp)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(os.path.dirname(path) or ".")


_SYNC_POOL = None  # the fsync worker threads, made on first use


class GuardedCheckpointEngine:
    """Wraps a DeepSpeed checkpoint engine: `load` is `safe_load`; a failed `makedirs` or `save` is recorded in
    `error` (the first one, described) and the save's later writes on this rank are skipped, never raised inside
    DeepSpeed's save. Also marks the fault-injection points after each file DeepSpeed writes, and lists the files
    and directories this rank wrote in `written` (`begin_save()` clears it), for the save to fsync them."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.error: str | None = None
        self.written: list[str] = []
        self.fsync_s = 0.0  # seconds the last save waited for this rank's files to reach the device
        self.syncing: list = []  # fsyncs under way (futures), one per file written

    def begin_save(self, error: str | None = None) -> None:
        self.error, self.written, self.fsync_s, self.syncing = error, [], 0.0, []

    def _sync_in_background(self, path: str) -> None:
        """fsync a file just written on a worker thread while DeepSpeed serialises the next one (the device writes
        while the CPU pickles); the save waits for them all before COMPLETE (`wait_synced`)."""
        global _SYNC_POOL
        if _SYNC_POOL is None:
            from concurrent.futures import ThreadPoolExecutor

            _SYNC_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="megacoca-fsync")
        self.syncing.append((path, _SYNC_POOL.submit(fsync_path, path)))

    def wait_synced(self) -> None:
        """Wait for the background fsyncs; the first one's OSError is raised (with its file name)."""
        syncing, self.syncing = self.syncing, []
        for path, future in syncing:
            try:
                future.result()
            except OSError as error:
                error.filename = error.filename or path
                raise

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def makedirs(self, path, exist_ok=False):
        if self.error is None:
            try:
                self.inner.makedirs(path, exist_ok=exist_ok)
                self.written.append(path)
            except OSError as error:
                self.error = f"{error.strerror or error} creating {path}"

    def save(self, state_dict, path: str):
        if self.error is not None:
            return
        try:
            self.inner.save(state_dict, path)
            self.written.append(path)
            self._sync_in_background(path)
            if path.endswith("model_states.pt"):
                faults.point("save:after_model_states")
            elif path.endswith("optim_states.pt"):
                faults.point("save:after_optim_states")
        except (OSError, RuntimeError) as error:
            self.error = describe_write_error(error, path)
            try:
                os.remove(path)  # a partial file only takes space on a full disk
            except OSError:
                pass

    def load(self, path: str, map_location=None):
        return safe_load(path, map_location=map_location)


def guard(engine) -> GuardedCheckpointEngine:
    """Install (once) and return the GuardedCheckpointEngine of a DeepSpeed engine. DeepSpeed's one write that
    does not go through its checkpoint engine (rank 0 copying zero_to_fp32.py next to the checkpoint) is guarded
    the same way."""
    current = engine.checkpoint_engine
    if not isinstance(current, GuardedCheckpointEngine):
        current = GuardedCheckpointEngine(current)
        engine.checkpoint_engine = current
        copy = getattr(engine, "_copy_recovery_script", None)
        if copy is not None:
            def copy_recovery_script(save_path):
                if current.error is None:
                    try:
                        copy(save_path)
                    except OSError as error:
                        current.error = f"{error.strerror or error} writing {error.filename or save_path}"

            engine._copy_recovery_script = copy_recovery_script
    return current


def remove_tree(path: str, marker: str) -> None:
    """Delete a checkpoint directory so that a kill midway never leaves it looking complete: `marker` first."""
    try:
        os.remove(os.path.join(path, marker))
    except FileNotFoundError:
        pass
    faults.point("remove:after_unmark")
    shutil.rmtree(path, ignore_errors=True)
