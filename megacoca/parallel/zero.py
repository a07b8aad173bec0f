"""What ZeRO-3 actually did to a module's parameters: how much of it each rank holds.

DeepSpeed keeps a tensor whole on every rank when it has fewer elements than
`zero_optimization.stage3_param_persistence_threshold` (1e5 by default), so a small model under "ZeRO-3" can
end up with no parameter partitioned at all. `partition_stats` says what happened; the trainer logs it and
the tests assert on it.

`keep_gathered` holds parameters whole across a step's forwards and backwards (the overlapped text tower's:
megacoca.parallel.overlap), with the marker megacoca.parallel.pipeline.zero3.GatheredForStep uses too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PartitionStats:
    tensors: int  # parameters of the module
    elements: int  # their full element count (ds_numel under ZeRO-3)
    partitioned_tensors: int  # split across the data-parallel ranks
    partitioned_elements: int
    local_elements: int  # elements this rank holds between forwards (its shards plus persistent tensors)

    @property
    def partitioned_fraction(self) -> float:
        return self.partitioned_elements / self.elements if self.elements else 0.0

    def describe(self) -> str:
        whole = self.tensors - self.partitioned_tensors
        return (f"ZeRO-3 partitions {self.partitioned_tensors}/{self.tensors} tensors "
                f"({100 * self.partitioned_fraction:.1f}% of {self.elements / 1e6:.2f}M elements); "
                f"{whole} stay whole on every rank (stage3_param_persistence_threshold); "
                f"this rank holds {self.local_elements / 1e6:.2f}M")


def is_zero3_param(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id") and hasattr(param, "ds_numel")


def partition_stats(module: torch.nn.Module) -> PartitionStats:
    """Count a module's parameters by how ZeRO-3 stores them (plain parameters count as whole)."""
    tensors = elements = partitioned_tensors = partitioned_elements = local = 0
    for param in module.parameters():
        tensors += 1
        if is_zero3_param(param):
            elements += param.ds_numel
            if getattr(param, "ds_persist", False):
                local += param.ds_numel
            else:
                partitioned_tensors += 1
                partitioned_elements += param.ds_numel
                local += param.ds_tensor.numel()
        else:
            elements += param.numel()
            local += param.numel()
    return PartitionStats(tensors, elements, partitioned_tensors, partitioned_elements, local)


# A submodule id no module has: while it is in a parameter's `ds_active_sub_modules`, ZeRO-3 never releases it
# (megacoca.parallel.pipeline.zero3 uses the same marker).
KEEP_GATHERED = -1


def keep_gathered(params: list, inflight=None) -> int:
    """Make every one of `params` (ZeRO-3 parameters) whole and keep it so: the partitioned ones all-gathered (over
    their data-parallel group, a collective: every rank calls this at the same point), those a ZeRO-3 prefetch has
    in flight awaited through `inflight` (the model's `ds_inflight_param_registry`), and all of them pinned by
    KEEP_GATHERED until DeepSpeed partitions every parameter (its optimizer step clears the pins). Returns how many
    were gathered; 0 when all were whole and pinned already (the rest of the step)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus  # heavy: only where ZeRO-3 runs

    for param in params:
        if param.ds_status == ZeroParamStatus.INFLIGHT:
            if inflight is None or param not in inflight:
                raise RuntimeError(f"ZeRO-3 parameter {param.ds_id} is in flight outside the model's registry")
            inflight.pop(param).wait()
    missing = [param for param in params if param.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if missing:
        missing[0].all_gather(param_list=missing)
    for param in params:
        param.ds_active_sub_modules.add(KEEP_GATHERED)
    return len(missing)
