"""Replicated parameters that must stay equal across the tensor-parallel group, checked and re-broadcast.

Every parameter that is not tensor-parallel (LayerNorms, row-parallel biases, pooler queries, the logit scale) is
equal across the tensor group by construction, as long as every rank computes the same gradient for it; a
non-deterministic device kernel can break that and the copies then drift apart silently. `check_replicas` compares
a checksum of each rank's copies in one all-gather over the tensor group and, on drift, re-broadcasts every copy of
the drifted parameters from tensor rank 0.

What "this rank's copies" of a parameter are (the same data-parallel rank holds the same ZeRO partition in every
tensor group, since the tensor ranks' parameter layouts are identical, so the pieces compare one to one):
- ZeRO-0 (a plain torch optimizer): the parameter (it is the master) and Adam's `exp_avg`/`exp_avg_sq` in
  `optimizer.state[param]`;
- ZeRO-1/2 and DeepSpeed's bf16 optimizer: the whole low-precision parameter, and the fragment of its fp32 master
  in this rank's flat partition (`param._hp_mapping`), with the moments at the same place in the base optimizer's
  state of that flat partition;
- ZeRO-3: the partition `param.ds_tensor`, the whole `param.data` where it is kept gathered (persistent small
  tensors), and the fp32 master and moments at the parameter's place in its sub-group's flat partition; of each
  partition only the parameter's elements, not the padding after its end (never written: garbage).
The moments are re-broadcast with the weights, or the next step's update would differ and the drift return.

The checksum of a piece is exact and order-free: over its bytes read as unsigned 16-bit words, the sum and the sum
of squares, in int64 (no rounding, so equal bytes give equal sums on any device, thread count or reduction order;
no overflow below 2^31 words; one changed element always changes the sum, two changes cancel only if they swap
values), with its byte count. A float64 sum of the values rides along only to report how large the drift is.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megacoca.parallel.tensor import is_tensor_parallel
from megacoca.parallel.zero import is_zero3_param

KINDS = ("weight", "gathered", "fp32 master", "exp_avg", "exp_avg_sq")
MOMENTS = ("exp_avg", "exp_avg_sq")
FIELDS = 4  # bytes, word sum, word square sum, float64 value sum (its bits)
NAMES_SHOWN = 4


def check_replicas(module: torch.nn.Module, optimizer_or_engine, dims, *, fix: bool = True) -> str | None:
    """Compare this rank's copies of every replicated parameter with tensor rank 0's (one all-gather over
    `dims.tp_group`; every rank of the group calls it at the same step) and, with `fix`, re-broadcast the drifted
    ones' weights, fp32 masters and Adam moments from tensor rank 0. Returns one line naming the drift, or None when
    there is none (at once, without a collective, for tp_size 1). Every rank of a tensor group returns the same."""
    if dims.tp_size == 1:
        return None
    optimizer = _optimizer_of(optimizer_or_engine)
    device = _device()
    named = [(name, param) for name, param in module.named_parameters() if not is_tensor_parallel(param)]
    pieces = [_pieces(param, optimizer) for _, param in named]
    local = torch.stack([torch.stack([_checksum(piece, device) for piece in kinds]) for kinds in pieces]) \
        if named else torch.zeros(0, len(KINDS), FIELDS, dtype=torch.int64, device=device)
    table = [torch.empty_like(local) for _ in range(dims.tp_size)]
    dist.all_gather(table, local, group=dims.tp_group)
    table = torch.stack(table).cpu()  # (tp, params, kinds, fields)
    if not torch.equal(table[..., 0], table[:1, ..., 0].expand_as(table[..., 0])):
        index = int((table[..., 0] != table[:1, ..., 0]).any(0).any(-1).nonzero()[0])
        raise RuntimeError(f"replica check: {named[index][0]}'s local copies differ in size across the tensor group "
                           "(the ranks' parameter layouts differ)")
    drifted = (table[..., 1:3] != table[:1, ..., 1:3]).flatten(2).any(-1).any(0).nonzero().flatten().tolist()
    if not drifted:
        return None
    values = table[..., 3].view(torch.float64)
    gaps = (values - values[:1]).abs().amax(0)  # (params, kinds)
    worst = max(((float(gaps[i, k]), i, k) for i in drifted for k in range(len(KINDS))), key=lambda item: item[0])
    if fix:
        _broadcast([piece for i in drifted for piece in pieces[i] if piece is not None], dims.tp_group, device)
    names = ", ".join(named[i][0] for i in drifted[:NAMES_SHOWN])
    more = f" and {len(drifted) - NAMES_SHOWN} more" if len(drifted) > NAMES_SHOWN else ""
    action = ("re-broadcast from tensor rank 0 (weights, fp32 masters, Adam moments)" if fix else
              "left as they are (fix=False)")
    return (f"replica check: {len(drifted)} of {len(named)} replicated parameters differ across the tensor group "
            f"(ranks {dist.get_process_group_ranks(dims.tp_group)}): {names}{more}; largest |difference of sums| "
            f"{worst[0]:.3g} ({KINDS[worst[2]]} of {named[worst[1]][0]}); {action}")


def _optimizer_of(optimizer_or_engine):
    from deepspeed.runtime.engine import DeepSpeedEngine  # heavy: only when there is a tensor group

    if isinstance(optimizer_or_engine, DeepSpeedEngine):
        return optimizer_or_engine.optimizer
    return optimizer_or_engine


def _device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())  # NCCL gathers device tensors


def _pieces(param: torch.nn.Parameter, optimizer) -> list[torch.Tensor | None]:
    """This rank's copies of `param`, in KINDS order (None: not held here), as views that writes go through."""
    if is_zero3_param(param):
        gathered = param.data if param.ds_numel and param.data.numel() == param.ds_numel else None
        valid = _zero3_valid(optimizer, param)
        return [param.ds_tensor.reshape(-1).narrow(0, 0, valid), gathered, *_zero3_state(optimizer, param, valid)]
    if hasattr(optimizer, "bit16_groups") or hasattr(optimizer, "bf16_groups"):
        return [param.data, None, *_hp_state(optimizer, param)]
    if isinstance(optimizer, torch.optim.Optimizer):
        state = optimizer.state.get(param, {})
        return [param.data, None, None, *(state.get(key) for key in MOMENTS)]
    raise TypeError(f"replica check: unsupported optimizer {type(optimizer).__name__}")


def _hp_state(optimizer, param) -> list[torch.Tensor | None]:
    """ZeRO-1/2 (and DeepSpeed's bf16 optimizer): the fragment of `param` in this rank's fp32 flat partition and
    the moments at the same place."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return [None] * 3  # no part of it in this rank's partition (or not trained)
    flats = getattr(optimizer, "single_partition_of_fp32_groups", None) or optimizer.fp32_groups_flat_partition
    state = optimizer.optimizer.state.get(flats[mapping.param_group_index], {})
    address = mapping.hp_fragment_address
    moments = [state[key].narrow(0, address.start, address.numel) if key in state else None for key in MOMENTS]
    return [mapping.hp_fragment, *moments]


def _zero3_valid(optimizer, param) -> int:
    """How many elements of this rank's ZeRO-3 partition of `param` are the parameter's: the rest is padding (a
    1-element tensor over 2 data-parallel ranks: all of the second rank's), never written, so not equal anywhere."""
    per_rank = param.ds_tensor.numel()
    return max(0, min(per_rank, param.ds_numel - optimizer._get_param_partition_rank(param) * per_rank))


def _zero3_state(optimizer, param, valid: int) -> list[torch.Tensor | None]:
    """ZeRO-3: `param`'s place in its sub-group's fp32 flat partition (its `valid` elements), master and moments."""
    if getattr(optimizer, "swap_optimizer", False) or getattr(optimizer, "params_in_nvme_and_cpu", False):
        raise ValueError("replica check: ZeRO-3 with NVMe offload is not supported: set fault.replica_check_every=0")
    if not param.requires_grad:
        return [None] * 3
    group, offset, _ = optimizer.grad_position[optimizer.get_param_id(param)]
    flat = optimizer.fp32_partitioned_groups_flat[group]
    state = optimizer.optimizer.state.get(flat, {})
    moments = [state[key].narrow(0, offset, valid) if key in state else None for key in MOMENTS]
    return [flat.narrow(0, offset, valid), *moments]


def _checksum(piece: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """(bytes, sum of 16-bit words, sum of their squares, float64 sum of the values as int64 bits)."""
    if piece is None or piece.numel() == 0:
        return torch.zeros(FIELDS, dtype=torch.int64, device=device)
    flat = piece.detach().reshape(-1).contiguous()
    words = flat.view(torch.int16).to(torch.int64) & 0xFFFF
    fields = [torch.tensor(flat.numel() * flat.element_size(), device=flat.device), words.sum(),
              (words * words).sum(), flat.double().sum().view(torch.int64)]
    return torch.stack(fields).to(device)


def _broadcast(pieces: list[torch.Tensor], group, device: torch.device) -> None:
    """Tensor rank 0's values of `pieces` into every rank's, in place: one broadcast per dtype."""
    source = dist.get_global_rank(group, 0)
    for dtype in sorted({piece.dtype for piece in pieces}, key=str):
        same = [piece for piece in pieces if piece.dtype == dtype]
        buffer = torch.cat([piece.detach().reshape(-1).to(device) for piece in same])
        dist.broadcast(buffer, src=source, group=group)
        with torch.no_grad():
            for piece, value in zip(same, buffer.split([piece.numel() for piece in same])):
                piece.copy_(value.view_as(piece))
