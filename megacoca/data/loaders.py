"""The training run's data loader, built from the job config for one rank."""

from __future__ import annotations

from megacoca.data.shards import ShardLoader
from megacoca.data.transforms import ImageTransform


def build_train_loader(job, model_cfg, dims, tokenizer) -> ShardLoader:
    """This data-parallel rank's share of `data.train_shards`: batches of `schedule.micro_batch_size` images
    (transformed for `model_cfg.image_size`) and captions (tokenized), resumable from its `state_dict()`."""
    return ShardLoader(job.data.train_shards, job.schedule.micro_batch_size, tokenizer,
                       ImageTransform(model_cfg.image_size, train=True), dp_rank=dims.dp_rank,
                       dp_size=dims.dp_size, num_workers=job.data.num_workers, seed=job.seed,
                       shard_retries=job.data.shard_retries, shard_timeout=job.data.shard_timeout_s or None)
