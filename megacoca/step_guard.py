"""The optimizer step's guard: a step whose loss or gradients are NaN/inf, or (optionally) whose loss spikes,
is skipped on every rank alike, and a run that keeps producing such steps stops with its last good state saved.

How a step is skipped, for every ZeRO stage, precision and layout: DeepSpeed's optimizers for ZeRO-1/2/3 and
bf16 already refuse a step whose gradients are not finite, deciding together over the data-parallel group and
the model-parallel (pipeline x tensor) slab, that is on every rank: no update, optimizer state untouched, lr
schedule not advanced (`engine.skipped_steps` counts it). So the guard only has to make sure that whatever
should skip a step reaches the gradients:

- a micro-batch whose loss is not finite is backpropagated as NaN (`gate`): a loss of +inf can otherwise give
  finite gradients, and the step would go ahead;
- a loss spike (loss > `loss_spike_factor` x the mean of the last `loss_spike_window` good steps) is decided
  before the step's last backward, from the global-batch loss, and that backward is made NaN on every rank of
  the deciding (last) stage; the NaN reaches every other stage through the pipeline's gradients;
- the client torch optimizer that DeepSpeed steps as is under ZeRO-0 fp32 never skips: the trainer checks the
  gradient norm it computes anyway for that case and the guard's wrapper around that optimizer's `step` skips
  it (DeepSpeed reads its `overflow` attribute, exactly as for its own optimizers).

After the step, every rank knows alike whether it was skipped (`engine.skipped_steps`), and on a skipped step
one small all-reduce tells every rank why (non-finite loss, non-finite gradients, loss spike).
"""

from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist

from megacoca.launch import faults

BAD_STEPS_EXIT_CODE = 65  # sysexits EX_DATAERR: the run stopped because the data or numerics went bad

REASONS = ("non-finite loss", "loss spike", "non-finite gradient norm")


class BadStepsError(RuntimeError):
    """`max_bad_steps` skipped steps in a row; raised on every rank after the last good state was saved."""

    exit_code = BAD_STEPS_EXIT_CODE


class _NaNGradient(torch.autograd.Function):
    """Identity forward; NaN backward (fault injection: a gradient becomes NaN while the loss stays finite)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def inject_loss_faults(loss: torch.Tensor, step: int) -> torch.Tensor:
    """MEGACOCA_FAULTS' step kinds for optimizer step `step` (megacoca.launch.faults); the loss itself otherwise."""
    if not faults.active():
        return loss
    if faults.at_step("nan_loss", step) is not None:
        loss = loss * float("nan")
    if faults.at_step("inf_loss", step) is not None:
        loss = loss + float("inf")
    factor = faults.at_step("loss_scale", step)
    if factor is not None:
        loss = loss * factor
    if faults.at_step("nan_grad", step) is not None:
        loss = _NaNGradient.apply(loss)
    return loss


class StepGuard:
    """Per rank: gates each micro-batch's loss before backward, and after each step says whether it was
    skipped and why, keeping count of skipped steps in a row."""

    def __init__(self, max_bad_steps: int, loss_spike_factor: float = 0.0, loss_spike_window: int = 50):
        self.max_bad_steps = max_bad_steps
        self.loss_spike_factor = loss_spike_factor
        self.good_losses: deque[float] = deque(maxlen=loss_spike_window)
        self.bad_in_row: list[tuple[int, str]] = []  # (step, reason) of the skipped steps since the last good one
        self.skipped_total = 0
        self.own_skip = False  # ZeRO-0 fp32: the trainer found the gradient norm not finite
        self._spike = False
        self._step_loss: float | None = None  # the global-batch loss the spike check saw this step
        self._skipped_before = 0

    # --------------------------------------------------------------------------------- before backward

    def gate(self, loss: torch.Tensor, last_micro: bool = False, step_loss_sum: torch.Tensor | None = None,
             micro_batches: int = 1, dp_group=None) -> torch.Tensor:
        """The loss to backpropagate: NaN where it is not finite; on the step's last micro-batch with the spike
        check on, NaN also when the global-batch loss (`step_loss_sum`: this rank's micro-batch losses of the
        step so far, this one included; averaged over them and the data-parallel group) spikes."""
        finite = torch.isfinite(loss.detach())
        gate = torch.where(finite, 1.0, float("nan")).to(loss.dtype)
        if last_micro and self.loss_spike_factor:
            # one small all-reduce per step, only with the spike check on
            total = step_loss_sum.detach().double().clone()
            dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
            if dp_size > 1:
                dist.all_reduce(total, group=dp_group)
            self._step_loss = float(total) / (micro_batches * dp_size)
            if len(self.good_losses) == self.good_losses.maxlen:
                mean = sum(self.good_losses) / len(self.good_losses)
                self._spike = self._step_loss > self.loss_spike_factor * mean  # NaN: False, the gate above has it
                if self._spike:
                    gate = torch.full_like(gate, float("nan"))
        return loss * gate

    # ------------------------------------------------------------------------------------ around the step

    def wrap_client_optimizer(self, optimizer) -> None:
        """A torch optimizer DeepSpeed steps as is (ZeRO-0 fp32) skips its step when `own_skip` is set, and says
        so through `overflow`, which DeepSpeed reads after every step (it then leaves the lr schedule alone and
        counts the step in `skipped_steps`)."""
        if hasattr(optimizer, "overflow"):
            return  # one of DeepSpeed's optimizers: it checks its gradients itself
        original = optimizer.step

        def step(*args, **kwargs):
            optimizer.overflow = self.own_skip
            if not optimizer.overflow:
                return original(*args, **kwargs)
            return None

        optimizer.overflow = False
        optimizer.step = step

    def before_step(self, engine) -> None:
        self._skipped_before = engine.skipped_steps
        self._spike = False
        self._step_loss = None
        self.own_skip = False

    def after_step(self, engine, step: int, loss_sums: torch.Tensor, device) -> str | None:
        """The reason the optimizer step just taken was skipped (the same on every rank), or None; counts it.
        Raises nothing: `should_stop` says when there were too many in a row."""
        skipped = engine.skipped_steps != self._skipped_before
        if not skipped:
            self.bad_in_row.clear()
            if self._step_loss is not None:
                self.good_losses.append(self._step_loss)
            return None
        # Why: every rank knows the step was skipped, but only some know the cause (the rank whose loss was not
        # finite, the last stage that saw the spike); one all-reduce over the world, on skipped steps only.
        codes = torch.tensor([0.0 if bool(torch.isfinite(loss_sums).all()) else 1.0, float(self._spike)],
                             device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(codes, op=dist.ReduceOp.MAX)
        reason = REASONS[0] if codes[0] else REASONS[1] if codes[1] else REASONS[2]
        self.skipped_total += 1
        self.bad_in_row.append((step, reason))
        return reason

    @property
    def should_stop(self) -> bool:
        return len(self.bad_in_row) >= self.max_bad_steps

    def describe_stop(self) -> str:
        steps = [step for step, _ in self.bad_in_row]
        reasons = sorted({reason for _, reason in self.bad_in_row})
        return (f"{len(steps)} optimizer steps in a row skipped (steps {steps[0]}-{steps[-1]}: {', '.join(reasons)}; "
                f"fault.max_bad_steps={self.max_bad_steps})")
