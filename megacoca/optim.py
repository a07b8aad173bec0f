"""The optimizer, its parameter groups and the lr schedule of a training run (AdamW, decoupled weight decay).

Owned here so that everything that must agree on them reads one definition: the engine build (megacoca.engine),
the planner's memory model (megacoca.plan.params: the groups' sizes), the one-process test reference and the
benchmarks. Imports nothing of megacoca beyond config.
"""

from __future__ import annotations

import math
import random
from typing import Callable

import numpy as np
import torch

from megacoca.config.deepspeed import offloads_optimizer
from megacoca.config.train import JobConfig, ScheduleConfig

# Parameters that never get weight decay, by name (beyond all 0/1-dim tensors: norms, biases, logit scale).
NO_DECAY_NAMES = ("embedding", "class_embedding", "cls_embedding", "query", "queries", "logit_scale")


def seed_everything(seed: int) -> None:
    """Python, numpy and torch (and CUDA) generators from one seed: the same initial weights on every rank."""
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


def lr_lambda(schedule: ScheduleConfig) -> Callable[[int], float]:
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


def lr_scheduler(schedule: ScheduleConfig) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    """What `deepspeed.initialize(lr_scheduler=...)` takes: the optimizer -> its LambdaLR."""
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule))


def build_optimizer(model: torch.nn.Module, job: JobConfig, ds_config: dict) -> torch.optim.Optimizer:
    """AdamW over `param_groups`; DeepSpeed's CPU Adam (AdamW mode) when the DeepSpeed config offloads it."""
    groups = param_groups(model, job.optim.weight_decay)
    kwargs = dict(lr=job.optim.lr, betas=tuple(job.optim.betas), eps=job.optim.eps)
    if offloads_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # only with optimizer offload: builds a C++ op

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)
