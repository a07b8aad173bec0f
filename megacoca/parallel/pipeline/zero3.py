"""ZeRO-3 under pipeline parallelism: DeepSpeed's one whole-world check, narrowed to a stage's replicas.

ZeRO-3's parameter coordinator records the order in which submodules run (for prefetching) and, until the trace
is complete, checks at the start of every forward that all ranks recorded the same order:
`assert_ints_same_as_other_ranks` broadcasts rank 0's list over the *whole world*. That assumes every rank runs
the same model. Under pipeline parallelism only the data-parallel replicas of one stage do (the ranks that
share its ZeRO partitions); the other stages run other modules, at other times. Over the world the check
deadlocks the pipeline (a stage blocks in the broadcast while the next one waits for its activations) or
compares different models. So for a pipeline run the check is made over the stage's data-parallel group,
which is what it protects: the ranks whose parameter fetches must agree. Under 1F1B the forwards and
backwards of different micro-batches interleave, so the recorded order changes from one forward to the next
and ZeRO-3 fetches parameters on demand instead of prefetching; the check then runs at every forward (one
small broadcast over the stage's data-parallel group).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.zero import partitioned_param_coordinator


def _check_over(group):
    source = dist.get_process_group_ranks(group)[0]
    device = torch.device(get_accelerator().current_device_name())  # NCCL broadcasts device tensors

    def assert_ints_same_as_other_ranks(ints: list[int]) -> None:
        length = torch.tensor([len(ints)], dtype=torch.int64, device=device)
        dist.broadcast(length, source, group=group)
        if int(length) != len(ints):
            raise RuntimeError(f"ZeRO-3 trace: rank {dist.get_rank()} recorded {len(ints)} entries, its stage's "
                               f"first replica (rank {source}) {int(length)}")
        values = torch.tensor(ints, dtype=torch.int64, device=device)
        dist.broadcast(values, source, group=group)
        if values.tolist() != list(ints):
            raise RuntimeError(f"ZeRO-3 trace: rank {dist.get_rank()} ran its submodules in another order than its "
                               f"stage's first replica (rank {source})")

    return assert_ints_same_as_other_ranks


_SCOPE: dict = {}  # "check": the stage-scoped check while a pipeline engine lives in this process


def _dispatch(ints: list[int]) -> None:
    check = _SCOPE.get("check")
    if check is None:
        return _SCOPE["original"](ints)  # no pipeline engine: DeepSpeed's own world-wide check
    return check(ints)


def scope_trace_check_to_stage(dp_group) -> None:
    """Make ZeRO-3's trace agreement check run over `dp_group` (this stage's replicas) instead of the world,
    until `unscope_trace_check()`. The function DeepSpeed calls is replaced once by a dispatcher; only the
    scope changes afterwards, so a later engine in the same process without a pipeline gets the original."""
    if "original" not in _SCOPE:
        _SCOPE["original"] = partitioned_param_coordinator.assert_ints_same_as_other_ranks
        partitioned_param_coordinator.assert_ints_same_as_other_ranks = _dispatch
    _SCOPE["check"] = _check_over(dp_group)


def unscope_trace_check() -> None:
    _SCOPE.pop("check", None)


# A submodule id no module has: while it is in a parameter's `ds_active_sub_modules`, ZeRO-3 never releases it.
_KEEP = -1


class GatheredForStep:
    """ZeRO-3 under the pipeline, `parallel.pipeline_keep_gathered`: gather every parameter of the stage once at
    the start of a step and keep it whole until just before the optimizer step, instead of ZeRO-3's gather and
    release around every submodule of every micro-batch's forward and backward (2 x m gathers per layer per
    step become 1). Costs the stage's full parameters in memory for the step, as ZeRO-1/2 would. The release
    happens before the optimizer step because the step writes the updated shards, which the next gather reads."""

    def __init__(self, module) -> None:
        self.params = [p for p in module.parameters() if hasattr(p, "ds_id")]
        self.held = False

    def gather(self) -> None:
        if self.params and not self.held:
            self.params[0].all_gather(param_list=self.params)
            for param in self.params:
                param.ds_active_sub_modules.add(_KEEP)
            self.held = True

    def release(self) -> None:
        if self.held:
            for param in self.params:
                param.ds_active_sub_modules.clear()  # the step's submodules are all done with it
            self.params[0].partition(param_list=self.params, has_been_updated=False)
            self.held = False
