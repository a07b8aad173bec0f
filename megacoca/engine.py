"""The DeepSpeed engine of a training run: the model built for the layout (tensor-parallel shards, activation
checkpointing, ZeRO-3 partitions, this rank's pipeline stage), AdamW over its parameter groups and the lr
schedule (megacoca.optim), handed to `deepspeed.initialize` with the layout's process groups."""

from __future__ import annotations

import deepspeed

from megacoca.config.layout import Layout
from megacoca.config.train import JobConfig
from megacoca.launch.deepspeed_comm import without_shared_memory_allreduce
from megacoca.optim import build_optimizer, lr_scheduler
from megacoca.parallel.build import build_parallel_model
from megacoca.parallel.dims import ParallelDims


def build_engine(job: JobConfig, layout: Layout, dims: ParallelDims, ds_config: dict, model_cfg, *,
                 pipeline_split=None, overlap_text_tower: str = "off"):
    """(engine, optimizer, lr scheduler) of `job` on this rank. Under pipeline parallelism the engine holds this
    rank's stage only (`pipeline_split`), and its checkpoint files are named per (stage, tensor rank).
    `overlap_text_tower`: how the text tower runs alongside the image tower ("off", "stream", "thread":
    megacoca.parallel.overlap.choose_overlap)."""
    model = build_parallel_model(model_cfg, dims, ds_config=ds_config, activation_checkpointing=layout.checkpointing,
                                 pipeline_split=pipeline_split, overlap_text_tower=overlap_text_tower)
    optimizer = build_optimizer(model, job, ds_config)
    without_shared_memory_allreduce()
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler(job.schedule),
        config=ds_config,
        mpu=dims.mpu(),
        dist_init_required=False,
    )
    if layout.grad_accum != engine.gradient_accumulation_steps():
        raise RuntimeError(f"DeepSpeed accumulates {engine.gradient_accumulation_steps()} micro-batches, the "
                           f"layout {layout.grad_accum}")
    if layout.pp > 1:
        # The mpu reports the tensor rank as the model-parallel rank (what DeepSpeed's grad norms need); the
        # checkpoint files still need one name per (stage, tensor rank).
        engine.checkpoint_mp_rank = dims.pp_rank * dims.tp_size + dims.tp_rank
    return engine, optimizer, scheduler

