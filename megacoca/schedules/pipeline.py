"""The step under pipeline parallelism: 1F1B with text-ahead over the stages, each its own DeepSpeed engine.

Each stage is its own DeepSpeed engine over its data-parallel group (ZeRO 0-3 shard the stage's parameters
there; tensor-parallel layers inside it talk over the tensor group). The order of work is
megacoca.parallel.pipeline.schedule.stage_actions; per micro-batch k:
- F(k): stage 0 embeds the images; the others receive the ViT hidden state from the stage before (it becomes a
  leaf that requires grad); stages before the last send their output on; the last stage computes the training
  outputs and the CoCa loss (the contrastive part gathered over its data-parallel group, as without a
  pipeline), and keeps the loss.
- B(k): the last stage backpropagates its loss (MicroBatchWork: the step guard's gate, DeepSpeed divides by the
  micro-batch count); the others receive d(loss)/d(output) from the stage after and call
  `engine.backward(sum(output * grad), scale_wrt_gas=False)` (the received gradient is already divided); every
  stage but the first sends the gradient of its input back. Backwards run in micro-batch order, so B(m - 1) is
  the accumulation boundary on every stage: the gradient reduction over the data-parallel group and the
  optimizer step happen there.
- T(k) (text-ahead): the last stage's text-tower forward, run before it waits for F(k)'s input.

Data: only stage 0 reads the step's micro-batches (it decodes the images, and only it knows which samples a
corrupt image dropped); at the start of the step it sends their text tokens to the last stage in one message, and
the stages between read nothing. Before a checkpoint is saved, stage 0's data position is given to every stage
of its pipeline (`share_data_position`), so every rank file holds the exact position.

Messages: the first activation a stage sends in a step (and the step's text) carries a shape header; the others,
and every gradient sent back (its activation's shape), go without one (megacoca.parallel.pipeline.p2p).

Global negatives (`loss.negatives: global`, megacoca.schedules.negatives): before 1F1B, a forward-only sweep of the
stages runs every micro-batch through the image tower and, on the last stage, the poolers and the text tower
(nothing kept but the embeddings, each stage's sends waited for at its end); the last stage computes the global
contrastive loss and its gradients, and 1F1B with text-ahead then runs as above with that loss as each micro-batch's
contrastive part. Every forward piece runs on its own seeded generators in both passes (`RandomPieces`: a
micro-batch's forward on every stage, and apart from it the last stage's text tower where text-ahead runs it).
"""

from __future__ import annotations

import time
from typing import Iterator

import torch
import torch.distributed as dist
from deepspeed.runtime.base_optimizer import ZeROOptimizer

from megacoca.parallel.pipeline.p2p import PendingSends, recv_tensor, send_tensor
from megacoca.parallel.pipeline.schedule import stage_actions
from megacoca.parallel.pipeline.zero3 import GatheredForStep, scope_trace_check_to_stage, unscope_trace_check
from megacoca.schedules.base import MicroBatchWork, Schedule, StepResult
from megacoca.schedules.negatives import GlobalNegatives, piece


class PipelineSchedule(Schedule):
    def __init__(self, work: MicroBatchWork, split, *, text_ahead: int, keep_gathered: bool = False,
                 zero3: bool = False, negatives: GlobalNegatives | None = None) -> None:
        """`split`: the StageSplit the engine's stage was cut by; `text_ahead`: text-tower forwards the last stage
        runs ahead (resolved: >= 0); `keep_gathered` (ZeRO-3): the stage's parameters gathered once per step;
        `negatives`: global negatives (a forward-only sweep first)."""
        self.work, self.split, self.text_ahead, self.negatives = work, split, text_ahead, negatives
        self.engine, self.dims = work.engine, work.dims
        self.stage = work.engine.module
        self.micro_batches = work.micro_batches
        self.device = work.device
        ranks, s = self.dims.pp_ranks, self.dims.pp_rank
        self.pp_ranks = ranks
        self.prev = ranks[s - 1] if s > 0 else None
        self.next = ranks[s + 1] if s < self.dims.pp_size - 1 else None
        self.actions = stage_actions(s, self.dims.pp_size, self.micro_batches, text_ahead)
        self.ahead = {k for kind, k in self.actions if kind == "T"}  # micro-batches whose text tower runs apart
        self.zero_optimizer = isinstance(self.engine.optimizer, ZeROOptimizer)
        self.gathered = GatheredForStep(self.stage) if keep_gathered else None
        self.zero3 = zero3
        if zero3:
            scope_trace_check_to_stage(self.dims.dp_group)
        # Of the last step: its wall time and the time this stage spent waiting for its neighbours (blocked in a
        # receive or on its pending sends): wait / step is this stage's measured bubble.
        self.last_step_s = 0.0
        self.last_wait_s = 0.0

    def describe(self) -> str:
        negatives = ", global negatives (a forward-only sweep first)" if self.negatives is not None else ""
        return (f"{self.split.describe()} | 1F1B over {self.micro_batches} micro-batches, text-ahead "
                f"{self.text_ahead}{negatives}")

    def log_fields(self) -> dict:
        """`pipeline_idle`: per stage, the fraction of the last step it spent waiting for its neighbours (its
        measured bubble); an all-gather over the pipeline group."""
        own = torch.tensor([self.last_wait_s / max(self.last_step_s, 1e-9)], device=self.device)
        parts = [torch.zeros_like(own) for _ in range(self.dims.pp_size)]
        dist.all_gather(parts, own, group=self.dims.pp_group)
        fields = {"pipeline_idle": [round(float(part), 4) for part in parts]}
        if self.negatives is not None:  # the last stage's, on every stage
            error = self.negatives.replay_error.to(self.device).reshape(1).float()
            dist.broadcast(error, self.pp_ranks[-1], group=self.dims.pp_group)
            fields["negatives_replay_error"] = float(error)
        return fields

    def share_data_position(self, loader) -> None:
        """Stage 0's loader position, broadcast over the pipeline group, loaded by every other stage's loader."""
        state = [loader.state_dict() if self.stage.is_first and hasattr(loader, "state_dict") else None]
        dist.broadcast_object_list(state, self.pp_ranks[0], group=self.dims.pp_group)
        if not self.stage.is_first and state[0] is not None:
            take = getattr(loader, "mirror", None) or getattr(loader, "load_state_dict", None)  # PositionMirror
            if take is not None:
                take(state[0])

    def close(self) -> None:
        if self.zero3:
            unscope_trace_check()

    def _recv(self, src: int, like=None) -> torch.Tensor:
        began = time.perf_counter()
        tensor = recv_tensor(src, self.dims.pp_group, self.device, like)
        self.last_wait_s += time.perf_counter() - began
        return tensor

    def _close_backward(self) -> None:
        """Do what DeepSpeed's engine does at the start of every forward, after each backward: its ZeRO
        optimizers count a micro-batch as done (ZeRO-3's accumulate-or-copy switch, ZeRO-1/2's per-backward
        state) only when the next forward starts, assuming forwards and backwards alternate. 1F1B runs
        several backwards in a row (the drain, and every backward of stage 0 when it holds all micro-batches),
        and without this each of them would overwrite the previous one's gradients instead of adding to them."""
        if self.zero_optimizer:
            self.engine.optimizer.clear_backward_seen_flag()

    def _step_inputs(self, batches: Iterator[dict], run: "_StepRun") -> None:
        """This stage's inputs of the step: stage 0 reads the micro-batches (images kept, the text tokens of all of
        them sent to the last stage in one message); the last stage receives those tokens; others read nothing."""
        if self.stage.is_first:
            micro = [next(batches) for _ in range(self.micro_batches)]
            run.images = [self.work.images(batch) for batch in micro]
            send_tensor(torch.stack([batch["text"] for batch in micro]).to(self.device), self.pp_ranks[-1],
                        self.dims.pp_group, run.pending)
        elif self.stage.is_last:
            run.texts = list(self._recv(self.pp_ranks[0]).unbind(0))

    def step(self, batches: Iterator[dict], step: int) -> StepResult:
        self.work.begin(step)
        began = time.perf_counter()
        self.last_wait_s = 0.0
        run = _StepRun(self.stage, step)
        self._step_inputs(batches, run)
        if self.stage.is_last:
            self.work.count_tokens(run.texts)
        if self.gathered is not None:
            self.gathered.gather()
        if self.negatives is not None:
            self._embedding_sweep(run)
        for kind, k in self.actions:
            if kind == "T":
                with piece(self.negatives, run.step, "T", k):
                    run.text_outputs[k] = self.engine(text=run.texts[k], keep=run.keep(k), part="text")
            elif kind == "F":
                self._forward(run, k)
            else:
                self._backward(run, k)
        waited = time.perf_counter()
        run.pending.wait()
        self.last_wait_s += time.perf_counter() - waited
        self.last_step_s = time.perf_counter() - began
        dist.broadcast(self.work.sums, self.pp_ranks[-1], group=self.dims.pp_group)
        return self.work.result()

    def _send_activation(self, run: "_StepRun", y: torch.Tensor, pending: PendingSends) -> None:
        """The stage's output to the next stage, with the shape header if it is the step's first (the receiver reads
        one exactly then: `run.activation` is unknown until it has)."""
        send_tensor(y, self.next, self.dims.pp_group, pending, header=not run.sent_header)
        run.sent_header = True

    def _embedding_sweep(self, run: "_StepRun") -> None:
        """Global negatives' pass 1: every micro-batch through this stage without gradients, in order; the last
        stage keeps the normalised embeddings (its text tower apart where text-ahead runs it apart, as 1F1B will)
        and solves the global contrastive loss. Each stage waits for its sends at the end (their activations can
        go)."""
        pending = PendingSends()
        if self.stage.is_last:
            self.negatives.begin()
        with torch.no_grad():
            for k in range(self.micro_batches):
                if self.stage.is_first:
                    x = run.images[k]
                else:
                    x = self._recv(self.prev, run.activation)
                    run.activation = (x.shape, x.dtype)
                if not self.stage.is_last:
                    with piece(self.negatives, run.step, "F", k):
                        y = self.engine(x)
                    self._send_activation(run, y, pending)
                    continue
                text_outputs = None
                if k in self.ahead:
                    with piece(self.negatives, run.step, "T", k):
                        text_outputs = self.engine(text=run.texts[k], keep=run.keep(k), part="text")
                with piece(self.negatives, run.step, "F", k):
                    self.negatives.add(self.engine(x, text=run.texts[k], keep=run.keep(k), text_outputs=text_outputs,
                                                   contrastive=True, captioning=False))
        waited = time.perf_counter()
        pending.wait()
        self.last_wait_s += time.perf_counter() - waited
        if self.stage.is_last:
            self.negatives.solve()

    def _forward(self, run: "_StepRun", k: int) -> None:
        """F(k): this stage's forward of micro-batch k; the last stage's ends in the CoCa loss, kept for B(k)."""
        if self.stage.is_first:
            x = run.images[k]
        else:
            x = self._recv(self.prev, run.activation).requires_grad_()
            run.activation = (x.shape, x.dtype)
            run.inputs[k] = x
        with piece(self.negatives, run.step, "F", k):
            if self.stage.is_last:
                out = self.engine(x, text=run.texts[k], keep=run.keep(k), text_outputs=run.text_outputs.pop(k, None),
                                  **self.work.model_kwargs)
            else:
                y = self.engine(x)
        if self.stage.is_last:
            contrastive = self.negatives.contrastive(k, out) if self.negatives is not None else None
            run.losses[k] = self.work.loss(out, contrastive)
        else:
            run.outputs[k] = y
            self._send_activation(run, y, run.pending)

    def _backward(self, run: "_StepRun", k: int) -> None:
        """B(k): this stage's backward of micro-batch k, then `engine.step()` (the optimizer's at the last)."""
        last = k == self.micro_batches - 1
        self.engine.set_gradient_accumulation_boundary(last)
        if self.stage.is_last:
            self.work.backward(run.losses.pop(k), last)
        else:
            y = run.outputs.pop(k)
            grad = self._recv(self.next, (y.shape, y.dtype))
            self.engine.backward((y * grad).sum(), scale_wrt_gas=False)
        self._close_backward()
        if not self.stage.is_first:
            send_tensor(run.inputs.pop(k).grad, self.prev, self.dims.pp_group, run.pending, header=False)
        if last:
            if self.gathered is not None:
                self.gathered.release()
            self.work.before_optimizer_step()
        self.engine.step()


class _StepRun:
    """What one step keeps between its actions on this stage: the inputs, each micro-batch's text length, the
    text-ahead outputs, received activations, sent outputs and losses awaiting their backward, the pending sends,
    the activations' (shape, dtype) once the step's first one said it, and whether this stage sent its header."""

    def __init__(self, stage, step: int) -> None:
        self.stage, self.step = stage, step
        self.sent_header = False
        self.images: list[torch.Tensor] = []
        self.texts: list[torch.Tensor] = []
        self.pending = PendingSends()
        self.keeps: dict[int, int] = {}
        self.text_outputs: dict[int, tuple] = {}
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.losses: dict[int, torch.Tensor] = {}
        self.activation: tuple[torch.Size, torch.dtype] | None = None

    def keep(self, k: int) -> int:
        """Micro-batch k's trimmed text length (a host sync: once per micro-batch)."""
        if k not in self.keeps:
            self.keeps[k] = self.stage.text_keep(self.texts[k])
        return self.keeps[k]
