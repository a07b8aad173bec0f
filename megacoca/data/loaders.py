"""The training run's data loader for one rank, built from the job config: which ranks read data, and what they read.

Under pipeline parallelism only stage 0 (`pp_rank` 0) reads and decodes batches: it needs the images, and only
it can tell which samples are valid (a corrupt image drops its sample); the stages after it get what they use
from it through the pipeline schedule. Every other stage's rank holds a `PositionMirror` of its data-parallel
rank's loader, which reads nothing and keeps the exact position the training step gives it (stage 0's
`state_dict()`), so every rank's checkpoint file holds the data position.
"""

from __future__ import annotations

from megacoca.data.mirror import PositionMirror
from megacoca.data.mixture import MixtureLoader, MixtureMirror
from megacoca.data.shards import ShardLoader
from megacoca.data.source_text import text_rule
from megacoca.data.transforms import ImageTransform


def reads_data(dims) -> bool:
    """Whether this rank reads the training data: the first pipeline stage's ranks (every rank without a pipeline)."""
    return dims.pp_rank == 0


def build_train_loader(job, model_cfg, dims, tokenizer) -> ShardLoader | PositionMirror | MixtureLoader | MixtureMirror:
    """On a rank that reads (`reads_data`): this data-parallel rank's share of `data.train_shards`, batches of
    `schedule.micro_batch_size` images (transformed for `model_cfg.image_size`) and captions (tokenized),
    resumable from its `state_dict()`. On any other rank: the PositionMirror of that loader (the same shards,
    dp rank and size, workers and seed), which yields nothing and holds the position given to it. With
    `data.sources`, the same for the mixture (megacoca.data.mixture: MixtureLoader, MixtureMirror)."""
    if job.data.sources:
        return _build_mixture_loader(job, model_cfg, dims, tokenizer)
    if not reads_data(dims):
        return PositionMirror(job.data.train_shards, job.schedule.micro_batch_size, dp_rank=dims.dp_rank,
                              dp_size=dims.dp_size, num_workers=job.data.num_workers, seed=job.seed)
    return ShardLoader(job.data.train_shards, job.schedule.micro_batch_size, tokenizer,
                       ImageTransform(model_cfg.image_size, train=True), dp_rank=dims.dp_rank,
                       dp_size=dims.dp_size, num_workers=job.data.num_workers, seed=job.seed,
                       shard_retries=job.data.shard_retries, shard_timeout=job.data.shard_timeout_s or None)


def _build_mixture_loader(job, model_cfg, dims, tokenizer) -> MixtureLoader | MixtureMirror:
    data, micro = job.data, job.schedule.micro_batch_size
    if not reads_data(dims):
        return MixtureMirror(data.sources, micro, dp_rank=dims.dp_rank, dp_size=dims.dp_size,
                             num_workers=data.num_workers, seed=job.seed)
    rules = {source.name: text_rule(source, job.seed) for source in data.sources}
    return MixtureLoader(data.sources, rules, micro, tokenizer, ImageTransform(model_cfg.image_size, train=True),
                         dp_rank=dims.dp_rank, dp_size=dims.dp_size, num_workers=data.num_workers, seed=job.seed,
                         on_source_failure=data.on_source_failure, shard_retries=data.shard_retries,
                         shard_timeout=data.shard_timeout_s or None)
