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
import random
import time
from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist

from megacoca.config.deepspeed import build_deepspeed_config, offloads_optimizer, precision_dtype, zero_stage
from megacoca.config.train import JobConfig
from megacoca.metrics.records import train_record
from megacoca.parallel.dims import ParallelDims

EvalFn = Callable[[torch.nn.Module, int], dict]

# Parameters that never get weight decay, by name (beyond all 0/1-dim tensors: norms, biases, logit scale).
NO_DECAY_NAMES = ("embedding", "class_embedding", "cls_embedding", "query", "queries", "logit_scale")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decoupled weight decay on matmul weights only: not on norms, biases, embeddings (token, positional,
    class, CLS), pooler queries or the logit scale."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 partitioned params are empty outside forward
        if len(shape) < 2 or any(part in name for part in NO_DECAY_NAMES):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(schedule) -> Callable[[int], float]:
    """Linear warmup to the peak, then cosine or linear decay to `min_lr_ratio` x peak at `steps`."""
    warmup, total, floor = schedule.warmup_steps, schedule.steps, schedule.min_lr_ratio

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule.decay == "constant" or total <= warmup:
            return 1.0
        progress = min((step - warmup) / (total - warmup), 1.0)
        if schedule.decay == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1 - floor) * (1 - progress)

    return factor


def build_optimizer(model: torch.nn.Module, job: JobConfig, ds_config: dict) -> torch.optim.Optimizer:
    groups = param_groups(model, job.optim.weight_decay)
    kwargs = dict(lr=job.optim.lr, betas=tuple(job.optim.betas), eps=job.optim.eps)
    if offloads_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def full_parameter_count(model: torch.nn.Module) -> int:
    """Parameters of the whole (single-device) model, from any rank's shards: tensor-parallel parameters count
    their full shape (vocabulary padding excluded), ZeRO-3 partitions their full numel."""
    total = 0
    for param in model.parameters():
        shard = getattr(param, "tp_shard", None)
        if shard is not None:
            total += math.prod(shard.full_shape)
        else:
            total += getattr(param, "ds_numel", param.numel())
    return total


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
        checkpointing = job.parallel.activation_checkpointing
        if model is None:
            model = build_parallel_model(self.model_config, self.dims, ds_config=self.ds_config,
                                         activation_checkpointing=checkpointing)
        else:
            model = parallelize(model, self.dims, activation_checkpointing=checkpointing)
        optimizer = build_optimizer(model, job, self.ds_config)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(job.schedule)),
            config=self.ds_config,
            mpu=self.dims.mpu(),
            dist_init_required=False,
        )
        self.device = self.engine.device
        self.loss_fn = CoCaLoss(job.optim.contrastive_weight, job.optim.caption_weight)
        self.grad_accum = self.engine.gradient_accumulation_steps()
        self.step = 0
        self.history: list[dict] = []  # the train records this rank computed (all ranks, for tests)

        precision = "bf16" if self.dtype == torch.bfloat16 else "fp32"
        self.flops_per_sample = train_flops_per_sample(self.model_config)
        self.device_name = current_device_name()
        self.peak = peak_flops(self.device_name, precision)
        self.logger = logger or MetricsLogger(job.run_dir, enabled=self.rank == 0,
                                              tensorboard=job.logging.tensorboard, total_steps=job.schedule.steps)
        self.logger.info(
            f"megacoca: {job.name} | {full_parameter_count(model) / 1e6:.2f}M params | {self.dims} | ZeRO-{zero_stage(self.ds_config)} "
            f"{precision} | batch {job.schedule.global_batch_size} = {job.schedule.micro_batch_size} x dp "
            f"{self.dims.dp_size} x accum {self.grad_accum} | {self.flops_per_sample / 1e9:.3g} GFLOP/sample "
            f"| device {self.device_name or self.device} (peak {'unknown' if self.peak is None else f'{self.peak / 1e12:.0f} TFLOP/s'})"
        )
        self.partition = None  # ZeRO-3 only: how much of the model this rank holds
        if zero_stage(self.ds_config) == 3:
            from megacoca.parallel.zero import partition_stats

            self.partition = partition_stats(self.engine.module)
            self.logger.info(self.partition.describe())

    # ------------------------------------------------------------------------------------------ resume

    def resume(self) -> bool:
        """Apply checkpoint.resume ("none", "auto" or a path); returns whether a checkpoint was loaded."""
        from megacoca.checkpoint import find_resume_checkpoint, load_checkpoint

        target = find_resume_checkpoint(self.job)
        if target is None:
            if self.job.checkpoint.resume == "auto":
                self.logger.info(f"resume auto: no complete checkpoint in {self.job.checkpoint_dir}; starting fresh")
            return False
        state = load_checkpoint(self.engine, target, self.train_loader, dp_size=self.dims.dp_size)
        self.step = state["step"]
        self.logger.resume_at(self.step)
        self.logger.info(f"resumed from {target} at step {self.step}")
        return True

    def save(self) -> str:
        from megacoca.checkpoint import save_checkpoint

        return save_checkpoint(self.engine, self.job, self.step, self.train_loader, dp_size=self.dims.dp_size)

    # ------------------------------------------------------------------------------------------- train

    def _batches(self):
        while True:  # a finite loader (epochs=N) restarts; ShardLoader's default is endless
            produced = False
            for batch in self.train_loader:
                produced = True
                yield batch
            if not produced:
                raise RuntimeError("the training data loader produced no batch")

    def forward_backward(self, batch: dict) -> torch.Tensor:
        """One micro-batch: forward, CoCa loss, backward (DeepSpeed scales it by the accumulation steps).
        Returns (loss, loss_contrastive, loss_caption, logit_scale) detached, on the device."""
        images = batch["images"].to(self.device, dtype=self.dtype, non_blocking=True)
        text = batch["text"].to(self.device, non_blocking=True)
        out = self.engine(images, text)
        loss, parts = self.loss_fn(out, dp_group=self.dims.dp_group)
        self.engine.backward(loss)
        return torch.stack([loss.detach().float(), parts["loss_contrastive"].float(), parts["loss_caption"].float(),
                            parts["logit_scale"].float()])

    def train_step(self, batches) -> dict:
        sums = torch.zeros(4, device=self.device)  # stays on the device: no host sync per micro-batch
        lr = self.optimizer.param_groups[0]["lr"]
        own_norm = None
        for micro in range(self.grad_accum):
            sums += self.forward_backward(next(batches))
            if micro == self.grad_accum - 1 and self._needs_own_grad_norm:
                own_norm = self._replicated_grad_norm()
            self.engine.step()
        self.step += 1
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = own_norm
        return {"sums": sums, "lr": lr, "grad_norm": grad_norm}

    @property
    def _needs_own_grad_norm(self) -> bool:
        """DeepSpeed reports no grad norm for ZeRO-0 fp32 with a client optimizer (it clips, but drops it)."""
        return zero_stage(self.ds_config) == 0 and self.dtype == torch.float32

    def _replicated_grad_norm(self) -> float:
        """Norm of the (already data-parallel averaged) gradients before clipping: tensor-parallel shards summed
        over the tensor-parallel group, replicated parameters counted once."""
        from megacoca.parallel.tensor import is_tensor_parallel

        squares = torch.zeros(2, dtype=torch.float64, device=self.device)
        for param in self.engine.module.parameters():
            if param.grad is not None:
                squares[0 if is_tensor_parallel(param) else 1] += param.grad.detach().double().pow(2).sum()
        if self.dims.tp_size > 1:
            if self.dims.tp_rank != 0:
                squares[1] = 0.0
            dist.all_reduce(squares, group=self.dims.tp_group)
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

    def train(self) -> list[dict]:
        job = self.job
        batches = self._batches()
        last_saved = self.step if self.step else -1
        last_evaluated = self.step if self.step else -1
        window_start, window_steps = time.perf_counter(), 0
        while self.step < job.schedule.steps:
            result = self.train_step(batches)
            window_steps += 1
            if self.step % job.logging.log_every == 0 or self.step == job.schedule.steps:
                losses = self._reduce(result["sums"])
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - window_start
                record = train_record(
                    step=self.step, losses=losses, lr=result["lr"], grad_norm=result["grad_norm"],
                    samples_per_s=window_steps * job.schedule.global_batch_size / max(elapsed, 1e-9),
                    flops_per_sample=self.flops_per_sample, world_size=self.dims.world_size, peak_flops=self.peak,
                    skipped_samples=self._skipped_samples())
                self.history.append(record)
                self.logger.log_train(record)
                window_start, window_steps = time.perf_counter(), 0
            if self.eval_fn is not None and job.eval.every and self.step % job.eval.every == 0:
                self.evaluate()
                last_evaluated = self.step
                window_start, window_steps = time.perf_counter(), 0
            if job.checkpoint.every and self.step % job.checkpoint.every == 0:
                self.save()
                last_saved = self.step
                window_start, window_steps = time.perf_counter(), 0
        if self.eval_fn is not None and job.eval.every and last_evaluated != self.step:
            self.evaluate()  # the finished model is always evaluated, on the last step, sharded like the others
        if job.checkpoint.save_final and last_saved != self.step:
            self.save()
        return self.history

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
        self.logger.close()
