"""Run one optimizer step of a pipeline stage: the schedule's actions against this stage's DeepSpeed engine.

Each stage is its own DeepSpeed engine over its data-parallel group (ZeRO 0-3 shard the stage's parameters
there; tensor-parallel layers inside it talk over the tensor group). Per micro-batch k:
- F(k): stage 0 embeds the images; the others receive the ViT hidden state from the stage before (it becomes a
  leaf that requires grad); stages before the last send their output on; the last stage computes the
  training outputs and the CoCa loss (the contrastive part gathered over its data-parallel group, as without a
  pipeline), and keeps the loss.
- B(k): the last stage calls `engine.backward(loss)` (DeepSpeed divides by the micro-batch count); the others
  receive d(loss)/d(output) from the stage after and call `engine.backward(sum(output * grad),
  scale_wrt_gas=False)` (the received gradient is already divided); every stage but the first sends the
  gradient of its input back. Backwards run in micro-batch order, so B(m - 1) is the accumulation boundary
  on every stage: the gradient reduction over the data-parallel group and the optimizer step happen there.
- T(k) (text-ahead): the last stage's text-tower forward, run before it waits for F(k)'s input.
Every stage reads the same m micro-batches of its data-parallel rank (stage 0 uses the images, the last stage
the text), so the data position is the same on every stage of a pipeline.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from megacoca.parallel.pipeline.p2p import PendingSends, recv_tensor, send_tensor
from megacoca.parallel.pipeline.schedule import stage_actions


class PipelineRunner:
    def __init__(self, engine, dims, *, micro_batches: int, text_ahead: int, loss_fn, dtype: torch.dtype,
                 keep_gathered: bool = False, loss_gate=None, model_kwargs: dict | None = None) -> None:
        """`loss_gate(loss, last_micro, step_loss_sum)`, when given, returns the loss the last stage
        backpropagates (megacoca.step_guard.StepGuard.gate); `model_kwargs` go to the last stage's training
        forward (CoCaLoss.model_kwargs: which objectives to compute)."""
        self.engine = engine
        self.model_kwargs = model_kwargs or {}
        self.loss_gate = loss_gate
        self.stage = engine.module
        self.dims = dims
        self.micro_batches = micro_batches
        self.text_ahead = text_ahead
        self.loss_fn = loss_fn
        self.dtype = dtype
        self.device = engine.device
        ranks = dims.pp_ranks
        s = dims.pp_rank
        self.pp_ranks = ranks
        self.prev = ranks[s - 1] if s > 0 else None
        self.next = ranks[s + 1] if s < dims.pp_size - 1 else None
        self.actions = stage_actions(s, dims.pp_size, micro_batches, text_ahead)
        from deepspeed.runtime.base_optimizer import ZeROOptimizer

        self.zero_optimizer = isinstance(engine.optimizer, ZeROOptimizer)
        self.gathered = None
        if keep_gathered:
            from megacoca.parallel.pipeline.zero3 import GatheredForStep

            self.gathered = GatheredForStep(self.stage)
        # Of the last step: its wall time and the time this stage spent waiting for its neighbours (blocked in a
        # receive or on its pending sends): wait / step is this stage's measured bubble.
        self.last_step_s = 0.0
        self.last_wait_s = 0.0

    def _recv(self, src: int) -> torch.Tensor:
        began = time.perf_counter()
        tensor = recv_tensor(src, self.dims.pp_group, self.device)
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

    def step(self, batches, before_last_step=None) -> torch.Tensor:
        """One optimizer step over the next `micro_batches` batches. Returns, on every stage, the sums over the
        micro-batches of (loss, contrastive loss, caption loss, logit scale), computed on the last stage.
        `before_last_step()` runs after the last backward, before the optimizer step (every stage)."""
        stage, engine, group, m = self.stage, self.engine, self.dims.pp_group, self.micro_batches
        micro = [next(batches) for _ in range(m)]
        began = time.perf_counter()
        self.last_wait_s = 0.0
        texts: dict[int, tuple[torch.Tensor, int]] = {}
        text_outputs: dict[int, tuple] = {}
        inputs: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}
        losses: dict[int, torch.Tensor] = {}
        sums = torch.zeros(4, device=self.device)
        pending = PendingSends()
        if self.gathered is not None:
            self.gathered.gather()

        def text_of(k: int) -> tuple[torch.Tensor, int]:
            if k not in texts:
                text = micro[k]["text"].to(self.device, non_blocking=True)
                texts[k] = (text, stage.text_keep(text))
            return texts[k]

        for kind, k in self.actions:
            if kind == "T":
                text, keep = text_of(k)
                text_outputs[k] = engine(text=text, keep=keep, part="text")
            elif kind == "F":
                if stage.is_first:
                    x = micro[k]["images"].to(self.device, dtype=self.dtype, non_blocking=True)
                else:
                    x = self._recv(self.prev).requires_grad_()
                    inputs[k] = x
                if stage.is_last:
                    text, keep = text_of(k)
                    out = engine(x, text=text, keep=keep, text_outputs=text_outputs.pop(k, None), **self.model_kwargs)
                    loss, parts = self.loss_fn(out, dp_group=self.dims.dp_group)
                    losses[k] = loss
                    sums += torch.stack([loss.detach().float(), parts["loss_contrastive"].float(),
                                         parts["loss_caption"].float(), parts["logit_scale"].float()])
                else:
                    y = engine(x)
                    outputs[k] = y
                    send_tensor(y, self.next, group, pending)
            else:  # "B"
                engine.set_gradient_accumulation_boundary(k == m - 1)
                if stage.is_last:
                    loss = losses.pop(k)
                    if self.loss_gate is not None:
                        loss = self.loss_gate(loss, k == m - 1, sums[0])
                    engine.backward(loss)
                else:
                    y = outputs.pop(k)
                    grad = self._recv(self.next)
                    engine.backward((y * grad.to(y.dtype)).sum(), scale_wrt_gas=False)
                self._close_backward()
                if not stage.is_first:
                    x = inputs.pop(k)
                    send_tensor(x.grad, self.prev, group, pending)
                texts.pop(k, None)
                if k == m - 1:
                    if self.gathered is not None:
                        self.gathered.release()
                    if before_last_step is not None:
                        before_last_step()
                engine.step()
        waited = time.perf_counter()
        pending.wait()
        self.last_wait_s += time.perf_counter() - waited
        self.last_step_s = time.perf_counter() - began
        dist.broadcast(sums, self.pp_ranks[-1], group=group)
        return sums
