"""Checkpoints: crash-safe save/resume through DeepSpeed with data position and RNG state; consolidation to the
single-device model (consolidate.py); the one loader (loader.py: `megacoca.load`); exports (export.py); every load
weights_only (no file runs code)."""

from megacoca.checkpoint.consolidate import consolidated_state_dict, iter_consolidated
from megacoca.checkpoint.files import BadCheckpointError, CheckpointError, UnsafeCheckpointError, safe_load
from megacoca.checkpoint.state import (
    complete_checkpoints,
    find_resume_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

__all__ = [
    "BadCheckpointError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "complete_checkpoints",
    "consolidated_state_dict",
    "find_resume_checkpoint",
    "iter_consolidated",
    "load_checkpoint",
    "save_checkpoint",
    "safe_load",
]
