"""Consolidate a megacoca/DeepSpeed checkpoint into one fp32 state dict (no DeepSpeed engine needed).

Per model-parallel rank r (the tensor rank, or stage x tp + tensor rank under pipeline parallelism), the files
named `*mp_rank_{r:02d}*`: ZeRO-1/2/3 checkpoints go through DeepSpeed's
`get_fp32_state_dict_from_zero_checkpoint` (it merges the fp32 master partitions of every
data-parallel rank; it only knows mp rank 00, so each rank's files are shown to it under that name in a
scratch directory of links); ZeRO-0 checkpoints hold that rank's module in `mp_rank_{r:02d}_model_states.pt`.
With tensor parallelism the ranks' state dicts are then merged with the layout the checkpoint recorded
(`tensor_parallel` in the client state): shards concatenated along their dim and cut to the unpadded size;
replicated tensors taken once, after checking that every rank holds the same values. Under pipeline
parallelism each stage is merged so, and the stages' disjoint state dicts are joined.

No file is unpickled beyond tensors and plain data (megacoca.checkpoint.files): megacoca reads with `safe_load`,
and since DeepSpeed's zero_to_fp32 loads with `weights_only=False`, every file of the tag is checked first.
The output is safetensors.
"""

from __future__ import annotations

import glob
import os
import tempfile

import torch

from megacoca.checkpoint.files import checkpoint_files, safe_load, verify_files
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
    verify_files(checkpoint_files(path))  # before anything (DeepSpeed's zero_to_fp32 too) unpickles one
    return path


def client_state(tag_dir: str, mp_rank: int = 0) -> dict:
    """DeepSpeed's client state (step, dp_size, the run's job config, the tensor-parallel layout of that rank's
    stage, the pipeline layout) from the first model-states file of model-parallel rank `mp_rank`."""
    files = sorted(glob.glob(os.path.join(tag_dir, f"*mp_rank_{mp_rank:02d}_model_states.pt")))
    if not files:
        return {}
    state = safe_load(files[0])
    return {key: state[key] for key in ("step", "dp_size", "config", "tensor_parallel", "pipeline") if key in state}


def _mp_rank_state(tag_dir: str, mp_rank: int, mp_size: int) -> dict[str, torch.Tensor]:
    """The fp32 state dict of one model-parallel rank (its tensor-parallel shards)."""
    checkpoint_dir, tag = os.path.split(tag_dir)
    marker = f"mp_rank_{mp_rank:02d}"
    if glob.glob(os.path.join(tag_dir, "*optim_states.pt")) and glob.glob(os.path.join(tag_dir, "*zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        if mp_size == 1:
            return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)
        with tempfile.TemporaryDirectory(prefix="megacoca_consolidate_") as scratch:
            os.makedirs(os.path.join(scratch, tag))
            for path in glob.glob(os.path.join(tag_dir, f"*{marker}*")):
                link = os.path.basename(path).replace(marker, "mp_rank_00")
                os.symlink(os.path.abspath(path), os.path.join(scratch, tag, link))
            return get_fp32_state_dict_from_zero_checkpoint(scratch, tag=tag)
    files = sorted(glob.glob(os.path.join(tag_dir, f"{marker}_model_states.pt")))
    if not files:
        raise FileNotFoundError(f"{tag_dir} holds no DeepSpeed model states for {marker}")
    return safe_load(files[0])["module"]


def merge_tensor_parallel(states: list[dict], layout: dict) -> dict[str, torch.Tensor]:
    """The single-device state dict from the tensor-parallel ranks' ones (rank order) and the recorded layout."""
    merged = {}
    for name, value in states[0].items():
        entry = layout["params"].get(name)
        if entry is None:
            for rank, other in enumerate(states[1:], start=1):
                if not torch.equal(other[name], value):
                    raise ValueError(f"replicated tensor {name} differs between tensor-parallel ranks 0 and {rank}: "
                                     "the checkpoint is inconsistent")
            merged[name] = value
            continue
        whole = torch.cat([state[name] for state in states], dim=entry["dim"])
        if whole.shape[entry["dim"]] != entry["padded"]:
            raise ValueError(f"{name}: the ranks' shards add up to {tuple(whole.shape)}, the layout says "
                             f"{entry['padded']} along dim {entry['dim']}")
        merged[name] = whole.narrow(entry["dim"], 0, entry["full_shape"][entry["dim"]]).clone()
    return merged


def consolidated_state_dict(path: str) -> dict[str, torch.Tensor]:
    """fp32 state dict of the single-device model in a checkpoint (tag directory or checkpoint directory), of any
    ZeRO stage, tensor-parallel and pipeline-parallel degree. Pipeline stage s wrote model-parallel ranks
    s * tp ... s * tp + tp - 1 under the single-device parameter names; the stages' merged state dicts are
    disjoint and together the whole model."""
    tag_dir = resolve_tag_dir(path)
    first = client_state(tag_dir)
    pipeline = first.get("pipeline") or {"pp": 1, "tp": (first.get("tensor_parallel") or {"size": 1})["size"]}
    pp, tp = pipeline["pp"], pipeline["tp"]
    state: dict[str, torch.Tensor] = {}
    for stage in range(pp):
        layout = (first if stage == 0 else client_state(tag_dir, stage * tp)).get("tensor_parallel")
        states = [_mp_rank_state(tag_dir, stage * tp + rank, pp * tp) for rank in range(tp)]
        stage_state = merge_tensor_parallel(states, layout) if tp > 1 else states[0]
        overlap = state.keys() & stage_state.keys()
        if overlap:
            raise ValueError(f"pipeline stage {stage} holds {sorted(overlap)[0]} as well as an earlier stage: the "
                             "checkpoint is inconsistent")
        state.update(stage_state)
    return {name: tensor.float() for name, tensor in state.items()}


def save_consolidated(path: str, output: str) -> str:
    """Write the fp32 state dict to `output` (a .safetensors file: exports are never pickles); returns it."""
    from safetensors.torch import save_file

    if not output.endswith(".safetensors"):
        raise ValueError(f"{output}: the consolidated weights are written as safetensors; name it *.safetensors")
    state = consolidated_state_dict(path)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    # safetensors refuses shared storage (a tied vocabulary head): store each tensor on its own.
    save_file({name: tensor.contiguous().clone() for name, tensor in state.items()}, output)
    return output
