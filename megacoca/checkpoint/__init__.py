"""Checkpoints: save/resume through DeepSpeed with data position and RNG state; consolidation to fp32."""

from megacoca.checkpoint.consolidate import consolidated_state_dict, save_consolidated
from megacoca.checkpoint.state import (
    complete_checkpoints,
    find_resume_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

__all__ = [
    "complete_checkpoints",
    "consolidated_state_dict",
    "find_resume_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "save_consolidated",
]
