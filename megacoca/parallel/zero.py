"""What ZeRO-3 actually did to a module's parameters: how much of it each rank holds.

DeepSpeed keeps a tensor whole on every rank when it has fewer elements than
`zero_optimization.stage3_param_persistence_threshold` (1e5 by default), so a small model under "ZeRO-3" can
end up with no parameter partitioned at all. `partition_stats` says what happened; the trainer logs it and
the tests assert on it.
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
