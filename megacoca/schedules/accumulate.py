"""The step without a pipeline: the micro-batches one after the other (gradient accumulation)."""

from __future__ import annotations

from typing import Iterator

from megacoca.schedules.base import MicroBatchWork, Schedule, StepResult


class AccumulationSchedule(Schedule):
    """Each of the step's micro-batches: forward (the overlapped text tower, where it is on, is inside the model),
    CoCa loss, backward, `engine.step()`; DeepSpeed steps the optimizer at the last one."""

    def __init__(self, work: MicroBatchWork) -> None:
        self.work = work
        self.engine = work.engine
        self.micro_batches = work.micro_batches

    def step(self, batches: Iterator[dict], step: int) -> StepResult:
        work = self.work
        work.begin(step)
        for micro in range(self.micro_batches):
            last = micro == self.micro_batches - 1
            batch = next(batches)
            out = self.engine(work.images(batch), work.text(batch), **work.model_kwargs)
            work.backward(work.loss(out), last)
            if last:
                work.before_optimizer_step()
            self.engine.step()
        return work.result()
