"""Schedules: every way of running one optimizer step's micro-batches, behind one signature (megacoca.schedules.base).

    schedule = build_schedule(engine, dims, layout, loss, guard, dtype=..., pad_id=..., seed=..., pipeline_split=...)
    result = schedule.step(batches, step)        # StepResult(loss_sums, grad_norm)

Chosen once per run from the layout: `AccumulationSchedule` without a pipeline, `PipelineSchedule` (1F1B with
text-ahead) with one; `layout.negatives == "global"` gives either its first pass for the global contrastive loss
(megacoca.schedules.negatives). A new schedule (another pipeline order) is a new Schedule subclass here and one
branch in `build_schedule`; the trainer does not change.
"""

from __future__ import annotations

import torch

from megacoca.config.layout import Layout
from megacoca.losses import CoCaLoss
from megacoca.parallel.pipeline.schedule import auto_text_ahead
from megacoca.schedules.accumulate import AccumulationSchedule
from megacoca.schedules.base import MicroBatchWork, Schedule, StepResult, replicated_grad_norm
from megacoca.schedules.negatives import GlobalNegatives, RandomPieces
from megacoca.schedules.pipeline import PipelineSchedule
from megacoca.step_guard import StepGuard

__all__ = ["AccumulationSchedule", "GlobalNegatives", "MicroBatchWork", "PipelineSchedule", "RandomPieces", "Schedule",
           "StepResult", "build_schedule", "replicated_grad_norm"]


def build_schedule(engine, dims, layout: Layout, loss: CoCaLoss, guard: StepGuard, *, dtype: torch.dtype,
                   pad_id: int, seed: int = 0, pipeline_split=None) -> Schedule:
    """The schedule of `layout` over `engine` (a DeepSpeed engine of the whole model, or of this rank's pipeline
    stage cut by `pipeline_split`). `pad_id`: the text padding (the step's caption tokens are counted from the
    data); `seed`: the run's (global negatives seed each forward piece from it)."""
    # DeepSpeed reports no grad norm for ZeRO-0 fp32 with a client optimizer (it clips, but drops it)
    own_grad_norm = layout.zero_stage == 0 and dtype == torch.float32
    work = MicroBatchWork(engine, dims, loss, guard, dtype=dtype, micro_batches=layout.grad_accum,
                          own_grad_norm=own_grad_norm, pad_id=pad_id)
    negatives = None
    if layout.negatives == "global":
        negatives = GlobalNegatives(layout.grad_accum, dims.dp_group, RandomPieces(seed, dims.dp_rank))
    if layout.pp == 1:
        return AccumulationSchedule(work, negatives)
    text_ahead = layout.text_ahead
    if text_ahead < 0:
        text_ahead = auto_text_ahead(pipeline_split, layout.pp, layout.grad_accum,
                                     separate_forward_costs=layout.zero_stage == 3 and not layout.keep_gathered)
    return PipelineSchedule(work, pipeline_split, text_ahead=text_ahead, keep_gathered=layout.keep_gathered,
                            zero3=layout.zero_stage == 3, negatives=negatives)
