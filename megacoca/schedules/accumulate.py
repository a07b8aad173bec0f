"""The step without a pipeline: the micro-batches one after the other (gradient accumulation), and with
`loss.negatives: global` a first pass over them for the global contrastive loss (megacoca.schedules.negatives)."""

from __future__ import annotations

from typing import Iterator

import torch

from megacoca.schedules.base import MicroBatchWork, Schedule, StepResult
from megacoca.schedules.negatives import GlobalNegatives, piece


class AccumulationSchedule(Schedule):
    """The step's micro-batches are read first (their caption tokens are counted before the first backward), then
    each: forward (the overlapped text tower, where it is on, is inside the model), CoCa loss, backward,
    `engine.step()`; DeepSpeed steps the optimizer at the last one. With `negatives` (global negatives), pass 1
    runs both towers of every micro-batch without gradients first, and each micro-batch's contrastive loss is the
    global one."""

    def __init__(self, work: MicroBatchWork, negatives: GlobalNegatives | None = None) -> None:
        self.work, self.negatives = work, negatives
        self.engine = work.engine
        self.micro_batches = work.micro_batches

    def describe(self) -> str | None:
        if self.negatives is None:
            return None
        return (f"global negatives: each step first runs both towers of its {self.micro_batches} micro-batch(es) "
                "without gradients, for the contrastive loss over the whole global batch")

    def log_fields(self) -> dict:
        if self.negatives is None:
            return {}
        return {"negatives_replay_error": float(self.negatives.replay_error)}

    def step(self, batches: Iterator[dict], step: int) -> StepResult:
        work = self.work
        work.begin(step)
        micro = [next(batches) for _ in range(self.micro_batches)]
        work.count_tokens([batch["text"] for batch in micro])
        keeps = self._embeddings(micro, step) if self.negatives is not None else [None] * self.micro_batches
        for k, batch in enumerate(micro):
            last = k == self.micro_batches - 1
            with piece(self.negatives, step, "F", k):  # pass 2 draws what pass 1 drew
                out = self.engine(work.images(batch), work.text(batch), keep=keeps[k], **work.model_kwargs)
            contrastive = self.negatives.contrastive(k, out) if self.negatives is not None else None
            work.backward(work.loss(out, contrastive), last)
            if last:
                work.before_optimizer_step()
            self.engine.step()
        return work.result()

    def _embeddings(self, micro: list[dict], step: int) -> list[int]:
        """Pass 1 of global negatives: every micro-batch's embeddings without gradients, then the global loss's
        gradients. Returns each micro-batch's text length, which pass 2 must run at too."""
        work, negatives = self.work, self.negatives
        module = getattr(self.engine, "module", self.engine)
        # pass 2's forward trims the text's trailing padding when it computes the caption loss: pass 1 runs the same
        trims = work.coca_loss.captioning
        keeps = [module.text_keep(batch["text"]) if trims else batch["text"].shape[1] for batch in micro]
        negatives.begin()
        with torch.no_grad():
            for k, batch in enumerate(micro):
                with piece(negatives, step, "F", k):
                    negatives.add(self.engine(work.images(batch), work.text(batch), keep=keeps[k],
                                              contrastive=True, captioning=False))
        negatives.solve()
        return keeps
