"""Checkpoints: crash-safe save/resume through DeepSpeed with data position and RNG state (state.py); resume under
another layout (reshape.py, reading a checkpoint's whole training state through full_state.py); consolidation to
the single-device model (consolidate.py); the one loader (loader.py: `megacoca.load`); exports (export.py); every
load weights_only (files.py: no file runs code). All of them stand on tags.py, the floor: tag names, COMPLETE and
`latest`, the one tag resolver, rank files, RNG state and the layout record (megacoca.config.layout.Layout).

Imports within the package run one way: files <- tags <- consolidate <- full_state <- reshape <- state, and
loader (on consolidate, reshape, tags) <- export; universal (DeepSpeed's universal-checkpoint info) is imported by
state when saving."""

from megacoca.checkpoint.consolidate import consolidated_state_dict, iter_consolidated
from megacoca.checkpoint.files import BadCheckpointError, CheckpointError, UnsafeCheckpointError, safe_load
from megacoca.checkpoint.state import (
    find_resume_checkpoint,
    load_checkpoint,
    resume_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from megacoca.checkpoint.tags import complete_checkpoints

__all__ = [
    "BadCheckpointError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "complete_checkpoints",
    "consolidated_state_dict",
    "find_resume_checkpoint",
    "iter_consolidated",
    "load_checkpoint",
    "resume_checkpoint",
    "verify_checkpoint",
    "save_checkpoint",
    "safe_load",
]
