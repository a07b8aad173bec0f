"""Consolidate a megacoca/DeepSpeed checkpoint into one fp32 state dict (no DeepSpeed engine needed).

ZeRO-1/2/3 checkpoints go through DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint` (it merges the
fp32 master partitions of every rank); ZeRO-0 checkpoints hold the whole module in the dp-rank-0 file.
"""

from __future__ import annotations

import glob
import os

import torch

from megacoca.checkpoint.state import COMPLETE, LATEST


def resolve_tag_dir(path: str) -> str:
    """A tag directory as given, or the `latest` complete one of a checkpoint directory."""
    path = path.rstrip("/")
    if os.path.isfile(os.path.join(path, LATEST)) and not glob.glob(os.path.join(path, "*model_states.pt")):
        with open(os.path.join(path, LATEST)) as f:
            path = os.path.join(path, f.read().strip())
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory {path}")
    if not os.path.isfile(os.path.join(path, COMPLETE)):
        raise FileNotFoundError(f"{path} has no {COMPLETE} marker: the save was interrupted")
    return path


def consolidated_state_dict(path: str) -> dict[str, torch.Tensor]:
    """fp32 state dict of the model in a checkpoint (tag directory or checkpoint directory)."""
    tag_dir = resolve_tag_dir(path)
    checkpoint_dir, tag = os.path.split(tag_dir)
    if glob.glob(os.path.join(tag_dir, "*optim_states.pt")) and glob.glob(os.path.join(tag_dir, "zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)
    else:
        files = sorted(glob.glob(os.path.join(tag_dir, "mp_rank_*_model_states.pt")))
        if not files:
            raise FileNotFoundError(f"{tag_dir} holds no DeepSpeed model states")
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {name: tensor.float() for name, tensor in state.items()}


def save_consolidated(path: str, output: str) -> str:
    """Write the fp32 state dict to `output` (.safetensors or .pt); returns the path written."""
    state = consolidated_state_dict(path)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    if output.endswith(".safetensors"):
        from safetensors.torch import save_file

        # safetensors refuses shared storage (a tied vocabulary head): store each tensor on its own.
        save_file({name: tensor.contiguous().clone() for name, tensor in state.items()}, output)
    else:
        torch.save(state, output)
    return output
