"""Trainer: the step loop around a DeepSpeed engine and a step schedule, with logging, eval and checkpoint hooks.

No model code and no communication code lives here: the engine comes from megacoca.engine (the model built for the
layout by megacoca.parallel, AdamW and the lr schedule from megacoca.optim), a step's micro-batches run through the
schedule chosen for the layout (megacoca.schedules: one signature, with or without a pipeline), the loss from
megacoca.losses, the groups from ParallelDims, checkpoints from megacoca.checkpoint, the log record from
megacoca.metrics. A step here is: the step guard's before, `schedule.step(batches, step)`, the guard's after, and
the record.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from megacoca.checkpoint import load_checkpoint, resume_checkpoint, save_checkpoint
from megacoca.checkpoint.tags import incomplete_checkpoints, tag_for
from megacoca.config.deepspeed import build_deepspeed_config, precision_dtype
from megacoca.config.layout import Layout, job_layout
from megacoca.config.train import JobConfig
from megacoca.engine import build_engine
from megacoca.launch import faults
from megacoca.launch.watchdog import StepWatchdog
from megacoca.losses import CoCaLoss
from megacoca.metrics.flops import train_flops_per_sample
from megacoca.metrics.logger import MetricsLogger
from megacoca.metrics.peak import current_device_name, peak_flops
from megacoca.metrics.records import source_record, train_record
from megacoca.metrics.stragglers import StragglerMonitor
from megacoca.optim import seed_everything
from megacoca.parallel.build import meta_model
from megacoca.parallel.dims import ParallelDims
from megacoca.parallel.overlap import choose_overlap
from megacoca.parallel.pipeline.split import split_stages
from megacoca.parallel.replicas import check_replicas
from megacoca.parallel.zero import partition_stats
from megacoca.schedules import build_schedule
from megacoca.step_guard import BadStepsError, StepGuard

EvalFn = Callable[[torch.nn.Module, int], dict]


class Trainer:
    """Build the engine and the step schedule for `job` over an initialised process group, then `train()`.

    train_loader: iterable of batches {"images", "text", ...} for this dp rank, with `state_dict()` /
        `load_state_dict()` (the data position) and optionally `skipped` (bad samples by reason). Under a pipeline
        only stage 0 iterates it; the others' position is set from stage 0's before each checkpoint.
    dims / layout / ds_config: the process groups, the layout and its DeepSpeed config (megacoca train passes the
        ones it checked; by default they are derived from the job over the process group's world).
    eval_fn: called as `eval_fn(model, step) -> dict` every `eval.every` steps on every rank (the model is
        the DeepSpeed engine, so ZeRO-3 parameters gather in its forward); rank 0's dict is logged.
    """

    def __init__(self, job: JobConfig, train_loader: Iterable, *, dims: ParallelDims | None = None,
                 layout: Layout | None = None, ds_config: dict | None = None, eval_fn: EvalFn | None = None,
                 logger=None):
        if not dist.is_initialized():
            raise RuntimeError("Trainer needs an initialised process group (megacoca train sets one up)")
        world = dist.get_world_size()
        self.job, self.train_loader, self.eval_fn, self.rank = job, train_loader, eval_fn, dist.get_rank()
        self.dims = dims or ParallelDims.from_config(job.parallel, world).build()
        self.ds_config = ds_config or build_deepspeed_config(job, self.dims.dp_size)
        self.layout = layout or job_layout(job, world, self.ds_config)
        self.dtype = precision_dtype(self.ds_config)
        self.model_config = job.model_config()
        self.grad_accum = self.layout.grad_accum
        self.pipeline_split = None
        if self.layout.pp > 1:
            self.pipeline_split = split_stages(self.model_config, self.layout.pp, job.parallel.pipeline_split)
        self.text_overlap = choose_overlap(job.parallel.overlap_text_tower, self.dims, self.layout.zero_stage,
                                           get_accelerator().device_name())
        seed_everything(job.seed)  # the same initial weights on every rank (and for every layout)
        self.engine, self.optimizer, self.scheduler = build_engine(
            job, self.layout, self.dims, self.ds_config, self.model_config, pipeline_split=self.pipeline_split,
            overlap_text_tower=self.text_overlap.mode)
        self.device = self.engine.device
        self.coca_loss = CoCaLoss(job.optim.contrastive_weight, job.optim.caption_weight)
        self.guard = StepGuard(job.fault.max_bad_steps, job.fault.loss_spike_factor, job.fault.loss_spike_window)
        self.guard.wrap_client_optimizer(self.engine.optimizer)
        self.schedule = build_schedule(self.engine, self.dims, self.layout, self.coca_loss, self.guard,
                                       dtype=self.dtype, pad_id=self.model_config.pad_id, seed=job.seed,
                                       pipeline_split=self.pipeline_split)
        self.step = 0
        self.history: list[dict] = []  # the train records this rank computed (all ranks, for tests)
        self.flops_per_sample = train_flops_per_sample(self.model_config, **self.coca_loss.model_kwargs)
        self.device_name = current_device_name()
        self.peak = peak_flops(self.device_name, self.layout.precision)
        self.logger = logger or MetricsLogger(job.run_dir, enabled=self.rank == 0,
                                              tensorboard=job.logging.tensorboard, total_steps=job.schedule.steps)
        self.partition = partition_stats(self.engine.module) if self.layout.zero_stage == 3 else None
        self._log_header()

    def _log_header(self) -> None:
        job, layout = self.job, self.layout
        total_params = meta_model(self.model_config).num_params()  # meta: no memory, the weights' RNG untouched
        peak = "unknown" if self.peak is None else f"{self.peak / 1e12:.0f} TFLOP/s"
        self.logger.info(
            f"megacoca: {job.name} | {total_params / 1e6:.2f}M params | {self.dims} | ZeRO-{layout.zero_stage} "
            f"{layout.precision} | batch {job.schedule.global_batch_size} = {job.schedule.micro_batch_size} x dp "
            f"{self.dims.dp_size} x accum {self.grad_accum} | {self.flops_per_sample / 1e9:.3g} GFLOP/sample "
            f"| device {self.device_name or self.device} (peak {peak})")
        if layout.negatives == "global":
            self.logger.info(f"contrastive negatives per image: {layout.contrastive_negatives} (the whole global batch "
                             f"of {job.schedule.global_batch_size}: loss.negatives=global)")
        else:
            self.logger.info(f"contrastive negatives per image: {layout.contrastive_negatives} (each micro-batch of "
                             f"{job.schedule.micro_batch_size} gathered over dp {self.dims.dp_size})")
        self.logger.info(self.text_overlap.describe())
        if hasattr(self.train_loader, "describe"):
            self.logger.info(self.train_loader.describe())
        described = self.schedule.describe()
        if described:
            self.logger.info(described)
        if self.partition is not None:
            self.logger.info(self.partition.describe())

    # ------------------------------------------------------------------------------------------ resume

    def resume(self) -> bool:
        """Apply checkpoint.resume ("none", "auto" or a path); returns whether a checkpoint was loaded. Tags whose
        save was interrupted are never chosen; they are reported here and removed by a later save. Raises
        megacoca.checkpoint.CheckpointError (one line, on every rank) for a file that is not tensors and data."""
        target = resume_checkpoint(self.job, say=self.logger.info)
        if self.job.checkpoint.resume == "auto":
            for _, partial in incomplete_checkpoints(self.job.checkpoint_dir):
                self.logger.info(f"resume auto: ignoring {partial}: its save was interrupted (no COMPLETE marker); "
                                 "a later save removes it")
        if target is None:
            if self.job.checkpoint.resume == "auto":
                self.logger.info(f"resume auto: no complete checkpoint in {self.job.checkpoint_dir}; starting fresh")
            return False
        state = load_checkpoint(self.engine, target, self.train_loader, layout=self.layout)
        self.step = state["step"]
        self.logger.resume_at(self.step)
        reshaped = f", reshaped {state['reshaped']}" if state.get("reshaped") else ""
        self.logger.info(f"resumed from {target} at step {self.step}{reshaped}")
        for line in getattr(self.train_loader, "changes", []):  # a mixture's weights or sources changed
            self.logger.info(line)
        return True

    def save(self) -> str:
        """A complete checkpoint of this step, or megacoca.checkpoint.CheckpointError on every rank (one line;
        the previous complete checkpoint untouched) when a write failed on any rank."""
        began = time.perf_counter()
        with self._timed("save"):
            self.schedule.share_data_position(self.train_loader)
            tag_dir = save_checkpoint(self.engine, self.job, self.step, self.train_loader, layout=self.layout)
        fsync_s = getattr(self.engine.checkpoint_engine, "fsync_s", 0.0)
        self.logger.info(f"checkpoint {tag_dir}: saved in {time.perf_counter() - began:.2f} s, of which "
                         f"{fsync_s:.3f} s syncing rank 0's files to disk")
        return tag_dir

    # ------------------------------------------------------------------------------------------- train

    def _batches(self):
        while True:  # a finite loader (epochs=N) restarts; ShardLoader's default is endless
            produced = False
            for batch in self.train_loader:
                produced = True
                yield batch
            if not produced:
                raise RuntimeError("the training data loader produced no batch")

    def train_step(self, batches) -> dict:
        """One optimizer step through the schedule. Returns {"sums": the step's CoCaLoss.LOGGED sums over its
        micro-batches (device tensor), "lr", "grad_norm", "skipped": why the step guard skipped its update (the same
        on every rank), or None}."""
        lr = self.optimizer.param_groups[0]["lr"]
        self.guard.before_step(self.engine)
        result = self.schedule.step(batches, self.step + 1)
        self.step += 1
        skipped = self.guard.after_step(self.engine, self.step, result.loss_sums, self.device)
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = result.grad_norm
        return {"sums": result.loss_sums, "lr": lr, "grad_norm": grad_norm, "skipped": skipped}

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

    def _source_fields(self) -> dict:
        """A mixture's per-source accounting over the data-parallel ranks (samples and skips summed, the epochs
        every rank completed: the minimum), as flat `data/<source>/...` fields; {} for a one-source loader."""
        accounting = getattr(self.train_loader, "accounting", None)
        if accounting is None:
            return {}
        per_source = accounting()
        names = list(per_source)
        sums = torch.tensor([[per_source[n]["samples"], per_source[n]["skipped"]] for n in names],
                            dtype=torch.float64, device=self.device)
        epochs = torch.tensor([float(per_source[n]["epochs"]) for n in names], dtype=torch.float64,
                              device=self.device)
        if self.dims.dp_size > 1:
            dist.all_reduce(sums, group=self.dims.dp_group)
            dist.all_reduce(epochs, op=dist.ReduceOp.MIN, group=self.dims.dp_group)
        return source_record({name: {"samples": int(sums[i, 0]), "skipped": int(sums[i, 1]),
                                     "epochs": int(epochs[i])} for i, name in enumerate(names)})

    preemption = None  # a megacoca.launch.preemption.PreemptionWatch: stop at a step boundary when it fires
    watchdog = None  # the megacoca.launch.watchdog.StepWatchdog of the build and train() (`with self._timed(phase):`)
    preempted = False  # train() stopped on a preemption signal: after a complete checkpoint, or before its first step

    def train(self) -> list[dict]:
        """The step loop, under the watchdog (megacoca.launch.watchdog: each step, the first, evaluations and saves
        timed, each with its own timeout; the one the CLI started at the build when it set `self.watchdog`, else one
        for this loop) and with the straggler report (megacoca.metrics.stragglers) in the logged records."""
        if self.watchdog is not None:
            return self._train()
        try:
            with StepWatchdog.for_job(self.job, self.rank, self.dims.world_size) as self.watchdog:
                return self._train()
        finally:
            self.watchdog = None

    def _timed(self, phase: str):
        """`with self._timed("save"):` the phase under the watchdog when one runs (megacoca.launch.watchdog)."""
        return self.watchdog.timing(phase) if self.watchdog is not None else contextlib.nullcontext()

    def _record(self, result: dict, window_steps: int, elapsed: float, stragglers: StragglerMonitor) -> dict:
        """The train record of the step just taken (collectives over the data-parallel and pipeline groups: every
        rank calls this at the same steps)."""
        job = self.job
        record = train_record(
            step=self.step, losses=self.coca_loss.logged(self._reduce(result["sums"])), lr=result["lr"],
            grad_norm=result["grad_norm"],
            samples_per_s=window_steps * job.schedule.global_batch_size / max(elapsed, 1e-9),
            flops_per_sample=self.flops_per_sample, world_size=self.dims.world_size, peak_flops=self.peak,
            skipped_samples=self._skipped_samples())
        record.update(self._source_fields())
        record.update(self.schedule.log_fields())
        straggler = stragglers.report(self.step, elapsed / window_steps)
        if straggler is not None:
            record["straggler"] = straggler
        if result["skipped"]:
            record.update(skipped_step=True, skip_reason=result["skipped"], skipped_steps=self.guard.skipped_total)
        return record

    def _train(self) -> list[dict]:
        job = self.job
        if self.preemption is not None and self.step < job.schedule.steps and self.preemption.agreed(self.device):
            # a signal on any rank during the build or the resume: nothing is new since the checkpoint resumed
            # (or none), so there is nothing to save
            self.preempted = True
            self.logger.info(f"preempted ({', '.join(self.preemption.received) or 'another rank'}) before the "
                             f"first step, at step {self.step}: nothing new to save; resume with --resume auto")
            return self.history
        stragglers = StragglerMonitor(job.fault.straggler_factor, self.device)
        batches = stragglers.timed(self._batches(), self.step)
        last_saved = self.step if self.step else -1
        last_evaluated = self.step if self.step else -1
        window_start, window_steps = time.perf_counter(), 0
        while self.step < job.schedule.steps:
            self.watchdog.begin_step(self.step + 1)
            result = self.train_step(batches)
            window_steps += 1
            if result["skipped"] or self.step % job.logging.log_every == 0 or self.step == job.schedule.steps:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                record = self._record(result, window_steps, time.perf_counter() - window_start, stragglers)
                self.history.append(record)
                self.logger.log_train(record)
                window_start, window_steps = time.perf_counter(), 0
            self.watchdog.end_step()
            if self.guard.should_stop:
                self._stop_for_bad_steps(last_saved)
            if job.fault.replica_check_every and self.step % job.fault.replica_check_every == 0:
                drift = check_replicas(self.engine.module, self.engine, self.dims)  # tensor group; fixes drift
                if drift:
                    self.logger.info(f"step {self.step}: {drift}")
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
        where = self.save() if last_saved != self.step else os.path.join(self.job.checkpoint_dir, tag_for(self.step))
        message = (f"{self.guard.describe_stop()}; saved the last good state (weights of step "
                   f"{self.guard.bad_in_row[0][0] - 1}) as {where}; stopping")
        raise BadStepsError(message)

    def evaluate(self) -> dict:
        self.engine.eval()
        try:
            with torch.no_grad(), self._timed("eval"):
                faults.point("eval:begin")
                metrics = self.eval_fn(self.engine, self.step) or {}
        finally:
            self.engine.train()
        self.logger.log_eval(self.step, metrics)
        return metrics

    def close(self) -> None:
        self.schedule.close()
        self.logger.close()
