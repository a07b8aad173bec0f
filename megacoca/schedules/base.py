"""The step seam: every way of running one optimizer step's micro-batches is a `Schedule` with one signature,
and the work every schedule does with a micro-batch is written once (`MicroBatchWork`).

    result = schedule.step(batches, step)      # -> StepResult(loss_sums, grad_norm)

A schedule takes its step's micro-batches from `batches` (an iterator of the loader's batches, this
data-parallel rank's), runs forward, CoCa loss and backward for each, and calls DeepSpeed's `engine.step()`
after every backward (DeepSpeed accumulates, reduces the gradients over the data-parallel group, clips and steps
the optimizer and lr schedule at the last). The trainer around it does only what is the same for every
schedule: the step guard's before/after, the record, evaluation and checkpoints (Megatron-core's
`get_forward_backward_func` plays this part there: no pipeline and 1F1B behind one signature).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from megacoca.losses import CoCaLoss, StepTokens, caption_token_count
from megacoca.parallel.tensor import is_tensor_parallel
from megacoca.step_guard import StepGuard, inject_loss_faults


@dataclass
class StepResult:
    """What a step's schedule returns on every rank. `loss_sums`: the sums over the step's micro-batches of
    CoCaLoss.LOGGED (loss, contrastive loss, caption loss, logit scale), a (4,) fp32 tensor on the device (no
    host sync), the same on every stage of a pipeline. `grad_norm`: the gradient norm this rank computed where
    DeepSpeed reports none (ZeRO-0 fp32), else None."""

    loss_sums: torch.Tensor
    grad_norm: float | None = None


class Schedule(ABC):
    """One way of running a step's micro-batches (no pipeline, 1F1B with text-ahead, ...), chosen once per run by
    megacoca.schedules.build_schedule from the layout and the config."""

    micro_batches: int

    @abstractmethod
    def step(self, batches: Iterator[dict], step: int) -> StepResult:
        """Run optimizer step number `step` (1-based: the step being computed) over the next `micro_batches`
        batches this rank reads from `batches`, optimizer step included."""

    def describe(self) -> str | None:
        """A line for the run's log header, or None."""
        return None

    def log_fields(self) -> dict:
        """Fields the trainer adds to a logged record (called on every rank at the same steps: it may be a
        collective)."""
        return {}

    def share_data_position(self, loader) -> None:
        """Before a checkpoint is saved (every rank): make every rank's loader hold the data position of the ranks
        that read the data, so every rank file records it exactly (a schedule where some ranks read nothing)."""

    def close(self) -> None:
        """Undo what the schedule changed outside itself (once, when the trainer closes)."""


def replicated_grad_norm(module: torch.nn.Module, dims) -> float:
    """Norm of the (already data-parallel averaged) gradients before clipping: tensor-parallel shards summed over
    the tensor-parallel group, replicated parameters counted once, pipeline stages summed."""
    squares = torch.zeros(2, dtype=torch.float64, device=next(module.parameters()).device)
    for param in module.parameters():
        if param.grad is not None:
            squares[0 if is_tensor_parallel(param) else 1] += param.grad.detach().double().pow(2).sum()
    if dims.tp_size > 1:
        if dims.tp_rank != 0:
            squares[1] = 0.0
        dist.all_reduce(squares, group=dims.tp_group)
    if dims.pp_size > 1:
        dist.all_reduce(squares, group=dims.pp_group)
    return float(squares.sum().sqrt())


class MicroBatchWork:
    """The work on one micro-batch that every schedule shares, written once: the inputs cast and moved, the step's
    caption tokens counted before its first backward, the CoCa loss (with MEGACOCA_FAULTS' injected faults) and its
    logged sums, the step guard's gate before backward, and the optimizer step after it (with this rank's own
    gradient norm before the last, where DeepSpeed reports none: ZeRO-0 fp32, whose client optimizer the guard then
    skips on a non-finite norm)."""

    def __init__(self, engine, dims, loss: CoCaLoss, guard: StepGuard, *, dtype: torch.dtype, micro_batches: int,
                 own_grad_norm: bool, pad_id: int) -> None:
        self.engine, self.dims, self.coca_loss, self.guard = engine, dims, loss, guard
        self.dtype, self.micro_batches, self.own_grad_norm = dtype, micro_batches, own_grad_norm
        self.pad_id = pad_id
        self.device = engine.device
        self.model_kwargs = loss.model_kwargs
        self.step = 0
        self.sums = torch.zeros(4, device=self.device)
        self.grad_norm: float | None = None
        self.step_tokens: StepTokens | None = None

    def begin(self, step: int) -> None:
        """A new optimizer step, number `step`: the sums start at 0 (they stay on the device: no host sync)."""
        self.step = step
        self.sums = torch.zeros(4, device=self.device)
        self.grad_norm = None
        self.step_tokens = None

    def count_tokens(self, texts: list[torch.Tensor]) -> None:
        """The caption tokens of the step's micro-batches `texts` (this rank's), summed over the data-parallel group
        (one all-reduce), before the step's first backward: each micro-batch's caption loss is then its share of the
        global batch's mean token loss (megacoca.losses.StepTokens). Every rank that computes the loss calls it."""
        if self.coca_loss.captioning:
            local = sum(caption_token_count(text, self.pad_id) for text in texts)
            self.step_tokens = StepTokens.count(local.to(self.device), self.micro_batches, self.dims.dp_group)

    def images(self, batch: dict) -> torch.Tensor:
        return batch["images"].to(self.device, dtype=self.dtype, non_blocking=True)

    def text(self, batch: dict) -> torch.Tensor:
        return batch["text"].to(self.device, non_blocking=True)

    def loss(self, out: dict, contrastive: torch.Tensor | None = None) -> torch.Tensor:
        """The CoCa loss of a micro-batch's training outputs (the contrastive part gathered over the data-parallel
        group, or `contrastive`: the global-negatives one), its logged values added to the step's sums."""
        loss, parts = self.coca_loss(out, dp_group=self.dims.dp_group, step_tokens=self.step_tokens,
                                     contrastive=contrastive)
        loss = inject_loss_faults(loss, self.step)
        self.sums += self.coca_loss.sums(loss, parts)
        return loss

    def backward(self, loss: torch.Tensor, last_micro: bool) -> None:
        """Backward of the loss the step guard lets through (DeepSpeed divides it by the accumulation steps)."""
        gated = self.guard.gate(loss, last_micro, self.sums[0], self.micro_batches, self.dims.dp_group)
        self.engine.backward(gated)

    def before_optimizer_step(self) -> None:
        """After the step's last backward, on every rank: this rank's own gradient norm where DeepSpeed reports
        none (a collective over the tensor and pipeline groups)."""
        if self.own_grad_norm:
            self.grad_norm = replicated_grad_norm(self.engine.module, self.dims)
            self.guard.own_skip = not math.isfinite(self.grad_norm)

    def result(self) -> StepResult:
        return StepResult(self.sums, self.grad_norm)
