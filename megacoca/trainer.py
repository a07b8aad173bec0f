"""Trainer: the step loop around a DeepSpeed engine, with logging, eval and checkpoint hooks.

No model code and no communication code lives here: the model comes from megacoca.models, built for the
layout by megacoca.parallel (tensor-parallel shards, activation checkpointing, ZeRO-3 partitions), the loss
(and its data-parallel gather) from megacoca.losses, the groups from ParallelDims, checkpoints from
megacoca.checkpoint, the log record from megacoca.metrics. A step is `gradient_accumulation_steps`
micro-batches, each through `forward_backward` (the seam a pipeline schedule replaces); DeepSpeed's engine
scales the loss, reduces the gradients, clips and steps the optimizer and the lr schedule at the boundary.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from megacoca.config.deepspeed import build_deepspeed_config, offloads_optimizer, precision_dtype, zero_stage
from megacoca.config.train import JobConfig
from megacoca.metrics.records import train_record
from megacoca.optim import build_optimizer, lr_scheduler, seed_everything
from megacoca.parallel.dims import ParallelDims
from megacoca.step_guard import BadStepsError, StepGuard, inject_loss_faults

EvalFn = Callable[[torch.nn.Module, int], dict]


def _meta_parameter_count(cfg) -> int:
    """Parameters of the whole single-device CoCa of `cfg` (built on the meta device: no memory)."""
    from megacoca.parallel.build import meta_model

    return meta_model(cfg).num_params()  # the count must not change the weights the real build draws


class Trainer:
    """Build the engine for `job` over an initialised process group, then `train()`.

    train_loader: iterable of batches {"images", "text", ...} for this dp rank, with `state_dict()` /
        `load_state_dict()` (the data position) and optionally `skipped` (bad samples by reason).
    eval_fn: called as `eval_fn(model, step) -> dict` every `eval.every` steps on every rank (the model is
        the DeepSpeed engine, so ZeRO-3 parameters gather in its forward); rank 0's dict is logged.
    model: a built single-device CoCa to train instead of building one (it is parallelized here; under ZeRO-3
        DeepSpeed partitions it after the fact, so every rank first holds it whole).
    """

    def __init__(self, job: JobConfig, train_loader: Iterable, *, dims: ParallelDims | None = None,
                 eval_fn: EvalFn | None = None, model: torch.nn.Module | None = None,
                 ds_config: dict | None = None, logger=None):
        import deepspeed

        from megacoca.losses import CoCaLoss
        from megacoca.metrics.flops import train_flops_per_sample
        from megacoca.metrics.logger import MetricsLogger
        from megacoca.metrics.peak import current_device_name, peak_flops
        from megacoca.parallel.build import build_parallel_model
        from megacoca.parallel.parallelize import parallelize

        if not dist.is_initialized():
            raise RuntimeError("Trainer needs an initialised process group (megacoca.train sets one up)")
        self.job = job
        self.dims = dims or ParallelDims.from_config(job.parallel, dist.get_world_size()).build()
        self.ds_config = ds_config or build_deepspeed_config(job, self.dims.dp_size)
        self.dtype = precision_dtype(self.ds_config)
        self.train_loader = train_loader
        self.eval_fn = eval_fn
        self.rank = dist.get_rank()

        seed_everything(job.seed)  # the same initial weights on every rank (and for every layout)
        self.model_config = model.cfg if model is not None and hasattr(model, "cfg") else job.model_config()
        self.grad_accum = job.grad_accum_steps(self.dims.dp_size)
        self.pipeline_split = None
        if self.dims.pp_size > 1:
            from megacoca.parallel.pipeline.split import split_stages

            self.pipeline_split = split_stages(self.model_config, self.dims.pp_size, job.parallel.pipeline_split)
        total_params = _meta_parameter_count(self.model_config)
        checkpointing = job.parallel.activation_checkpointing
        from deepspeed.accelerator import get_accelerator

        from megacoca.parallel.overlap import overlap_is_safe

        self.text_overlapped = job.parallel.overlap_text_tower == "auto" and overlap_is_safe(
            self.dims, zero_stage(self.ds_config), get_accelerator().device_name())
        if model is None:
            model = build_parallel_model(self.model_config, self.dims, ds_config=self.ds_config,
                                         activation_checkpointing=checkpointing, pipeline_split=self.pipeline_split,
                                         overlap_text_tower=self.text_overlapped)
        else:
            model = parallelize(model, self.dims, activation_checkpointing=checkpointing,
                                overlap_text_tower=self.text_overlapped)
            if self.pipeline_split is not None:
                from megacoca.parallel.pipeline.stage import PipelineStage

                model = PipelineStage(model, self.pipeline_split, self.dims.pp_rank)
        optimizer = build_optimizer(model, job, self.ds_config)
        from megacoca.launch.deepspeed_comm import without_shared_memory_allreduce

        without_shared_memory_allreduce()
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler(job.schedule),
            config=self.ds_config,
            mpu=self.dims.mpu(),
            dist_init_required=False,
        )
        self.device = self.engine.device
        self.coca_loss = CoCaLoss(job.optim.contrastive_weight, job.optim.caption_weight)
        self.guard = StepGuard(job.fault.max_bad_steps, job.fault.loss_spike_factor, job.fault.loss_spike_window)
        self.guard.wrap_client_optimizer(self.engine.optimizer)
        if self.grad_accum != self.engine.gradient_accumulation_steps():
            raise RuntimeError(f"DeepSpeed accumulates {self.engine.gradient_accumulation_steps()} micro-batches, the "
                               f"job {self.grad_accum}")
        self.pipeline = None
        if self.pipeline_split is not None:
            from megacoca.parallel.pipeline.runner import PipelineRunner
            from megacoca.parallel.pipeline.schedule import auto_text_ahead

            # The mpu reports the tensor rank as the model-parallel rank (what DeepSpeed's grad norms need); the
            # checkpoint files still need one name per (stage, tensor rank).
            self.engine.checkpoint_mp_rank = self.dims.pp_rank * self.dims.tp_size + self.dims.tp_rank
            if zero_stage(self.ds_config) == 3:
                from megacoca.parallel.pipeline.zero3 import scope_trace_check_to_stage

                scope_trace_check_to_stage(self.dims.dp_group)
            text_ahead = job.parallel.text_ahead
            if text_ahead < 0:
                text_ahead = auto_text_ahead(self.pipeline_split, self.dims.pp_size, self.grad_accum)
            keep_gathered = job.parallel.pipeline_keep_gathered and zero_stage(self.ds_config) == 3
            self.pipeline = PipelineRunner(self.engine, self.dims, micro_batches=self.grad_accum,
                                           text_ahead=text_ahead, loss_fn=self.loss_fn, dtype=self.dtype,
                                           keep_gathered=keep_gathered, loss_gate=self._gate,
                                           model_kwargs=self.coca_loss.model_kwargs)
        self.step = 0
        self.history: list[dict] = []  # the train records this rank computed (all ranks, for tests)

        precision = "bf16" if self.dtype == torch.bfloat16 else "fp32"
        self.flops_per_sample = train_flops_per_sample(self.model_config, **self.coca_loss.model_kwargs)
        self.device_name = current_device_name()
        self.peak = peak_flops(self.device_name, precision)
        self.logger = logger or MetricsLogger(job.run_dir, enabled=self.rank == 0,
                                              tensorboard=job.logging.tensorboard, total_steps=job.schedule.steps)
        self.logger.info(
            f"megacoca: {job.name} | {total_params / 1e6:.2f}M params | {self.dims} "
            f"| ZeRO-{zero_stage(self.ds_config)} "
            f"{precision} | batch {job.schedule.global_batch_size} = {job.schedule.micro_batch_size} x dp "
            f"{self.dims.dp_size} x accum {self.grad_accum} | {self.flops_per_sample / 1e9:.3g} GFLOP/sample "
            f"| device {self.device_name or self.device} (peak {'unknown' if self.peak is None else f'{self.peak / 1e12:.0f} TFLOP/s'})"
        )
        self.logger.info(f"contrastive negatives per image: {job.schedule.micro_batch_size * self.dims.dp_size - 1} "
                         f"(each micro-batch of {job.schedule.micro_batch_size} gathered over dp {self.dims.dp_size})")
        if self.text_overlapped:
            self.logger.info("the text tower runs on a CUDA side stream, overlapped with the image tower")
        if self.pipeline is not None:
            self.logger.info(f"{self.pipeline_split.describe()} | 1F1B over {self.grad_accum} micro-batches, "
                             f"text-ahead {self.pipeline.text_ahead}")
        self.partition = None  # ZeRO-3 only: how much of the model this rank holds
        if zero_stage(self.ds_config) == 3:
            from megacoca.parallel.zero import partition_stats

            self.partition = partition_stats(self.engine.module)
            self.logger.info(self.partition.describe())

    # ------------------------------------------------------------------------------------------ resume

    def resume(self) -> bool:
        """Apply checkpoint.resume ("none", "auto" or a path); returns whether a checkpoint was loaded. Tags whose
        save was interrupted are never chosen; they are reported here and removed by a later save. Raises
        megacoca.checkpoint.CheckpointError (one line, on every rank) for a file that is not tensors and data."""
        from megacoca.checkpoint import find_resume_checkpoint, load_checkpoint
        from megacoca.checkpoint.tags import incomplete_checkpoints

        target = find_resume_checkpoint(self.job)
        if self.job.checkpoint.resume == "auto":
            for _, partial in incomplete_checkpoints(self.job.checkpoint_dir):
                self.logger.info(f"resume auto: ignoring {partial}: its save was interrupted (no COMPLETE marker); "
                                 "a later save removes it")
        if target is None:
            if self.job.checkpoint.resume == "auto":
                self.logger.info(f"resume auto: no complete checkpoint in {self.job.checkpoint_dir}; starting fresh")
            return False
        state = load_checkpoint(self.engine, target, self.train_loader, layout=self._checkpoint_layout())
        self.step = state["step"]
        self.logger.resume_at(self.step)
        reshaped = f", reshaped {state['reshaped']}" if state.get("reshaped") else ""
        self.logger.info(f"resumed from {target} at step {self.step}{reshaped}")
        return True

    def save(self) -> str:
        """A complete checkpoint of this step, or megacoca.checkpoint.CheckpointError on every rank (one line;
        the previous complete checkpoint untouched) when a write failed on any rank."""
        from megacoca.checkpoint import save_checkpoint

        return save_checkpoint(self.engine, self.job, self.step, self.train_loader, layout=self._checkpoint_layout())

    def _checkpoint_layout(self):
        """The run's Layout, as checkpoints record and compare it (`self.layout` once the Trainer keeps one)."""
        from megacoca.config.layout import job_layout

        layout = getattr(self, "layout", None)
        return layout if layout is not None else job_layout(self.job, self.dims.world_size, self.ds_config)

    # ------------------------------------------------------------------------------------------- train

    def _batches(self):
        while True:  # a finite loader (epochs=N) restarts; ShardLoader's default is endless
            produced = False
            for batch in self.train_loader:
                produced = True
                yield batch
            if not produced:
                raise RuntimeError("the training data loader produced no batch")

    def loss_fn(self, out, dp_group=None):
        """The CoCa loss of a micro-batch of the step being computed (with MEGACOCA_FAULTS' injected faults)."""
        loss, parts = self.coca_loss(out, dp_group=dp_group)
        return inject_loss_faults(loss, self.step + 1), parts

    def _gate(self, loss: torch.Tensor, last_micro: bool, step_loss_sum: torch.Tensor) -> torch.Tensor:
        return self.guard.gate(loss, last_micro, step_loss_sum, self.grad_accum, self.dims.dp_group)

    def forward_backward(self, batch: dict, sums: torch.Tensor, last_micro: bool = True) -> torch.Tensor:
        """One micro-batch: forward, CoCa loss, backward (DeepSpeed scales it by the accumulation steps) of the
        loss the step guard lets through. Adds (loss, loss_contrastive, loss_caption, logit_scale), detached, to
        `sums` (on the device) and returns it."""
        images = batch["images"].to(self.device, dtype=self.dtype, non_blocking=True)
        text = batch["text"].to(self.device, non_blocking=True)
        out = self.engine(images, text, **self.coca_loss.model_kwargs)
        loss, parts = self.loss_fn(out, dp_group=self.dims.dp_group)
        sums += torch.stack([loss.detach().float(), parts["loss_contrastive"].float(), parts["loss_caption"].float(),
                             parts["logit_scale"].float()])
        self.engine.backward(self._gate(loss, last_micro, sums[0]))
        return sums

    def train_step(self, batches) -> dict:
        """One optimizer step; `skipped` is why the step guard skipped its update (the same on every rank), or
        None."""
        sums = torch.zeros(4, device=self.device)  # stays on the device: no host sync per micro-batch
        lr = self.optimizer.param_groups[0]["lr"]
        own_norm = None
        self.guard.before_step(self.engine)
        if self.pipeline is not None:
            sums = self.pipeline.step(batches, before_last_step=self._pipeline_grad_norm_hook)
            own_norm = self._pipeline_own_norm
        else:
            for micro in range(self.grad_accum):
                last = micro == self.grad_accum - 1
                self.forward_backward(next(batches), sums, last)
                if last and self._needs_own_grad_norm:
                    own_norm = self._replicated_grad_norm()
                    self.guard.own_skip = not math.isfinite(own_norm)
                self.engine.step()
        self.step += 1
        skipped = self.guard.after_step(self.engine, self.step, sums, self.device)
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = own_norm
        return {"sums": sums, "lr": lr, "grad_norm": grad_norm, "skipped": skipped}

    _pipeline_own_norm = None

    def _pipeline_idle(self) -> list[float]:
        """Per stage, the fraction of the last step it spent waiting for its neighbours (its measured bubble)."""
        own = torch.tensor([self.pipeline.last_wait_s / max(self.pipeline.last_step_s, 1e-9)], device=self.device)
        parts = [torch.zeros_like(own) for _ in range(self.dims.pp_size)]
        dist.all_gather(parts, own, group=self.dims.pp_group)
        return [round(float(part), 4) for part in parts]

    def _pipeline_grad_norm_hook(self) -> None:
        """Called by the pipeline runner after the step's last backward, before the optimizer step."""
        self._pipeline_own_norm = self._replicated_grad_norm() if self._needs_own_grad_norm else None
        if self._pipeline_own_norm is not None:
            self.guard.own_skip = not math.isfinite(self._pipeline_own_norm)

    @property
    def _needs_own_grad_norm(self) -> bool:
        """DeepSpeed reports no grad norm for ZeRO-0 fp32 with a client optimizer (it clips, but drops it)."""
        return zero_stage(self.ds_config) == 0 and self.dtype == torch.float32

    def _replicated_grad_norm(self) -> float:
        """Norm of the (already data-parallel averaged) gradients before clipping: tensor-parallel shards summed
        over the tensor-parallel group, replicated parameters counted once, pipeline stages summed."""
        from megacoca.parallel.tensor import is_tensor_parallel

        squares = torch.zeros(2, dtype=torch.float64, device=self.device)
        for param in self.engine.module.parameters():
            if param.grad is not None:
                squares[0 if is_tensor_parallel(param) else 1] += param.grad.detach().double().pow(2).sum()
        if self.dims.tp_size > 1:
            if self.dims.tp_rank != 0:
                squares[1] = 0.0
            dist.all_reduce(squares, group=self.dims.tp_group)
        if self.dims.pp_size > 1:
            dist.all_reduce(squares, group=self.dims.pp_group)
        return float(squares.sum().sqrt())

    def _reduce(self, sums: torch.Tensor) -> list[float]:
        """Micro-batch and data-parallel mean of the per-rank losses (= the global-batch loss)."""
        values = sums / self.grad_accum
        if self.dims.dp_size > 1:
            dist.all_reduce(values, group=self.dims.dp_group)
            values /= self.dims.dp_size
        return values.double().cpu().tolist()

    def _skipped_samples(self) -> int:
        """Bad samples the loaders skipped so far, summed over the data-parallel ranks."""
        skipped = getattr(self.train_loader, "skipped", 0) or 0
        count = torch.tensor([float(sum(skipped.values()) if isinstance(skipped, dict) else skipped)],
                             device=self.device)
        if self.dims.dp_size > 1:
            dist.all_reduce(count, group=self.dims.dp_group)
        return int(count.item())

    preemption = None  # a megacoca.launch.preemption.PreemptionWatch: stop at a step boundary when it fires
    watchdog = None  # the megacoca.launch.watchdog.StepWatchdog of the running train(): `with watchdog.paused():`
    preempted = False  # train() stopped early on a preemption signal, after a complete checkpoint

    def train(self) -> list[dict]:
        """The step loop, under the step watchdog (megacoca.launch.watchdog, armed in each step but the first, not
        in eval or saves) and with the straggler report (megacoca.metrics.stragglers) in the logged records."""
        from megacoca.launch.watchdog import StepWatchdog

        with StepWatchdog.for_job(self.job, self.rank, self.dims.world_size) as self.watchdog:
            return self._train()

    def _train(self) -> list[dict]:
        from megacoca.metrics.stragglers import StragglerMonitor

        job = self.job
        stragglers = StragglerMonitor(job.fault.straggler_factor, self.device)
        batches = stragglers.timed(self._batches(), self.step)
        last_saved = self.step if self.step else -1
        last_evaluated = self.step if self.step else -1
        window_start, window_steps = time.perf_counter(), 0
        while self.step < job.schedule.steps:
            self.watchdog.begin_step(self.step + 1)
            result = self.train_step(batches)
            window_steps += 1
            skipped = result["skipped"]
            if skipped or self.step % job.logging.log_every == 0 or self.step == job.schedule.steps:
                losses = self._reduce(result["sums"])
                for index, active in ((1, self.coca_loss.contrastive), (2, self.coca_loss.captioning)):
                    if not active:
                        losses[index] = None  # an objective the job dropped (its weight is 0)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - window_start
                record = train_record(
                    step=self.step, losses=losses, lr=result["lr"], grad_norm=result["grad_norm"],
                    samples_per_s=window_steps * job.schedule.global_batch_size / max(elapsed, 1e-9),
                    flops_per_sample=self.flops_per_sample, world_size=self.dims.world_size, peak_flops=self.peak,
                    skipped_samples=self._skipped_samples())
                if self.pipeline is not None:
                    record["pipeline_idle"] = self._pipeline_idle()
                straggler = stragglers.report(self.step, elapsed / window_steps)
                if straggler is not None:
                    record["straggler"] = straggler
                if skipped:
                    record.update(skipped_step=True, skip_reason=skipped, skipped_steps=self.guard.skipped_total)
                self.history.append(record)
                self.logger.log_train(record)
                window_start, window_steps = time.perf_counter(), 0
            self.watchdog.end_step()
            if self.guard.should_stop:
                self._stop_for_bad_steps(last_saved)
            if self.eval_fn is not None and job.eval.every and self.step % job.eval.every == 0:
                self.evaluate()
                last_evaluated = self.step
                window_start, window_steps = time.perf_counter(), 0
            if job.checkpoint.every and self.step % job.checkpoint.every == 0:
                self.save()
                last_saved = self.step
                window_start, window_steps = time.perf_counter(), 0
            if self.preemption is not None and self.step < job.schedule.steps and self.preemption.agreed(self.device):
                if last_saved != self.step:
                    self.save()
                self.preempted = True
                self.logger.info(f"preempted ({', '.join(self.preemption.received) or 'another rank'}): stopped "
                                 f"after step {self.step} with a complete checkpoint; resume with --resume auto")
                return self.history
        if self.eval_fn is not None and job.eval.every and last_evaluated != self.step:
            self.evaluate()  # the finished model is always evaluated, on the last step, sharded like the others
        if job.checkpoint.save_final and last_saved != self.step:
            self.save()
        return self.history

    def _stop_for_bad_steps(self, last_saved: int) -> None:
        """Too many skipped steps in a row: save the state (the weights, optimizer and lr schedule of the last good
        step, the data position past the bad batches) and raise BadStepsError on every rank."""
        from megacoca.checkpoint.tags import tag_for

        where = self.save() if last_saved != self.step else os.path.join(self.job.checkpoint_dir, tag_for(self.step))
        message = (f"{self.guard.describe_stop()}; saved the last good state (weights of step "
                   f"{self.guard.bad_in_row[0][0] - 1}) as {where}; stopping")
        raise BadStepsError(message)

    def evaluate(self) -> dict:
        self.engine.eval()
        try:
            with torch.no_grad():
                metrics = self.eval_fn(self.engine, self.step) or {}
        finally:
            self.engine.train()
        self.logger.log_eval(self.step, metrics)
        return metrics

    def close(self) -> None:
        if self.pipeline is not None:
            from megacoca.parallel.pipeline.zero3 import unscope_trace_check

            unscope_trace_check()
        self.logger.close()
