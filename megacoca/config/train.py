"""JobConfig: everything about a training run except the model's shapes (typed dataclasses, one per section).

A run is a named recipe (megacoca.config.recipes), optionally a YAML/JSON file of nested overrides, then
`--set section.key=value` overrides, in that order (`megacoca.config.recipes.build_config`). Every bad key or
value is a `ConfigError` with one line that names it, raised before any process group exists.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from megacoca.config.flavors import get_flavor
from megacoca.config.layout import infer_dp
from megacoca.config.model import CoCaConfig
from megacoca.config.overrides import ConfigError, apply_nested
from megacoca.config.sources import SourceConfig, ValSourceConfig, check_sources


@dataclass
class ModelChoice:
    flavor: str = "coca_tiny"  # a name from megacoca.config.flavors.FLAVORS
    overrides: dict[str, Any] = field(default_factory=dict)  # CoCaConfig fields to change

    def build(self) -> CoCaConfig:
        try:
            base = get_flavor(self.flavor)
        except (KeyError, ValueError) as error:
            raise ConfigError(f"model.flavor: {error}") from None
        unknown = sorted(set(self.overrides) - {f.name for f in dataclasses.fields(CoCaConfig)})
        if unknown:
            raise ConfigError(f"model.overrides: unknown CoCaConfig keys {unknown}")
        try:
            return base.replace(**self.overrides)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"model.overrides: {error}") from None


@dataclass
class DataConfig:
    train_shards: str = ""  # a directory of .tar shards, a glob, or a brace pattern
    val_shards: str = ""
    tokenizer: str = "clip-bpe"  # "clip-bpe" or a SentencePiece .model path
    num_workers: int = 0
    # Remote shards (`pipe:`, URLs): a failed command or connection is retried this many times, then the shard
    # is skipped and counted; a stream silent for shard_timeout_s seconds is a failed attempt (0: no timeout).
    shard_retries: int = 3
    shard_timeout_s: float = 120.0
    # A mixture of sources instead of train_shards (megacoca.config.sources; megacoca.data.mixture): each batch
    # draws its samples' sources by weight, every source keeps its own epochs and shard order.
    sources: list[SourceConfig] = field(default_factory=list)
    # A source none of whose samples can be read in a whole epoch (every shard corrupt or failed): "stop" ends the
    # run naming it (the default: silently training on another mixture than the one asked for changes the
    # experiment); "drop" logs it and goes on with the others, their weights renormalised.
    on_source_failure: Literal["stop", "drop"] = "stop"


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.1  # decoupled (AdamW); never on norms, biases, embeddings, queries, logit scale
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    contrastive_weight: float = 1.0
    caption_weight: float = 2.0


@dataclass
class ScheduleConfig:
    steps: int = 100  # optimizer steps
    global_batch_size: int = 32  # samples per optimizer step over all data-parallel ranks
    micro_batch_size: int = 16  # samples per forward on one rank; accumulation fills the rest
    warmup_steps: int = 10  # may exceed steps (a short debug run then never leaves warmup)
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0  # final lr as a fraction of the peak


@dataclass
class CheckpointConfig:
    dir: str = ""  # "" -> <run_dir>/checkpoints
    every: int = 0  # steps between saves; 0 saves only at the end
    keep: int = 2  # complete checkpoints kept; 0 keeps all
    resume: str = "none"  # "none", "auto" (newest complete checkpoint in dir) or a checkpoint path
    save_final: bool = True


@dataclass
class LoggingConfig:
    run_dir: str = "runs/{name}"  # "{name}" is replaced by JobConfig.name
    log_every: int = 1
    tensorboard: bool = True


@dataclass
class LossConfig:
    # Which samples an image's contrastive loss scores it against. "micro": its micro-batch gathered over the
    # data-parallel ranks (micro_batch_size x dp - 1 negatives). "global": the whole global batch, whatever the
    # accumulation, tensor or pipeline degrees (global_batch_size - 1 negatives, the paper's), computed exactly by
    # caching the embeddings' gradients (megacoca.schedules.negatives): one extra forward of both towers per step.
    negatives: Literal["micro", "global"] = "micro"


@dataclass
class EvalConfig:
    every: int = 0  # steps between calls of the trainer's eval hook; 0 disables
    # Named validation sets, each evaluated on its own (retrieval on a caption source, zero-shot top-1/top-5 on a
    # label source), in the periodic eval and in `megacoca eval --config`; metrics are prefixed `<name>/`.
    val_sources: list[ValSourceConfig] = field(default_factory=list)


@dataclass
class ParallelConfig:
    deepspeed_config: str = "zero3_bf16"  # a ds_configs/ name or a path to a DeepSpeed JSON
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # "auto": whatever the DeepSpeed JSON says
    dp: int = -1  # -1: world_size / (tp * pp)
    tp: int = 1
    pp: int = 1
    activation_checkpointing: bool = False  # recompute each transformer block in backward (parallelize step)
    # pp > 1: ViT blocks per pipeline stage (e.g. [14, 14, 12]; the last stage also holds the text side); None:
    # chosen by the FLOP cost model (megacoca.parallel.pipeline.split)
    pipeline_split: list[int] | None = None
    # pp > 1: text-tower forwards the last stage runs before its first image input arrives; -1: as many as the
    # cost model says fit in the warm-up wait; 0: off (plain 1F1B, the text tower inside the last stage's forward)
    text_ahead: int = -1
    # pp > 1 under ZeRO-3: gather each stage's parameters once per step and keep them whole until the optimizer
    # step (the stage's full parameters in memory during the step) instead of gathering per layer per micro-batch
    pipeline_keep_gathered: bool = False
    # Without a pipeline: run the unimodal text tower while the image tower runs (megacoca.parallel.overlap).
    # "auto": on a CUDA side stream (any tp, any ZeRO stage), off on a CPU; "stream": the side stream (off without
    # CUDA); "thread": in a second thread (on a CPU too: the tests' way; its threads compete for the rank's cores);
    # "off": never
    overlap_text_tower: Literal["auto", "off", "stream", "thread"] = "auto"
    # DeepSpeed JSON keys to change without copying the file, dotted: {"zero_optimization.reduce_bucket_size":
    # 1e7}; `--set parallel.deepspeed_overrides.zero_optimization.reduce_bucket_size=1e7` sets one.
    deepspeed_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class FaultConfig:
    """What the trainer does when a step goes wrong (megacoca.step_guard, megacoca.launch)."""

    # A step whose loss or gradient norm is NaN/inf is skipped on every rank (no update, optimizer state and lr
    # schedule untouched); after this many such steps in a row the run saves the last good state and stops.
    max_bad_steps: int = 3
    # Skip a step whose loss exceeds loss_spike_factor x the mean of the last loss_spike_window good steps'
    # losses (0 disables; the window must fill first). Counts toward max_bad_steps like a non-finite one.
    loss_spike_factor: float = 0.0
    loss_spike_window: int = 50
    # Hung ranks (megacoca.launch.watchdog): every collective gives up after collective_timeout_s; a train step
    # (after the first) making no progress for watchdog_timeout_s ends the job, naming the stalled rank (0: no
    # watchdog). The watchdog must be the shorter.
    collective_timeout_s: float = 1800.0
    watchdog_timeout_s: float = 600.0
    # The phases around the steps, each with its own timeout (0: not timed), named and ended as a stalled step is
    # (megacoca.launch.watchdog): the process group's rendezvous and set-up (a rank that never joins, or dies while
    # connecting, ends every other rank with status 124 after this long, not after the collective timeout), the
    # model and engine build, the resume, the first step (compilation, first gathers), an evaluation, a save.
    rendezvous_timeout_s: float = 600.0
    build_timeout_s: float = 1200.0
    resume_timeout_s: float = 1200.0
    first_step_timeout_s: float = 1200.0
    eval_timeout_s: float = 1800.0
    save_timeout_s: float = 1200.0
    # Name a rank whose step time exceeds straggler_factor x the median rank's, every log interval
    # (megacoca.metrics.stragglers; 0: off).
    straggler_factor: float = 1.5
    # Every this many steps, compare the replicated (not tensor-parallel) parameters across the tensor group (one
    # small all-gather of checksums) and re-broadcast any that drifted from tensor rank 0, weights, fp32 masters
    # and Adam moments (megacoca.parallel.replicas; 0: off; nothing to do at tp=1).
    replica_check_every: int = 1000


@dataclass
class JobConfig:
    name: str = "coca_tiny_cpu"
    seed: int = 0
    model: ModelChoice = field(default_factory=ModelChoice)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    @property
    def run_dir(self) -> str:
        return self.logging.run_dir.replace("{name}", self.name)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.run_dir, "checkpoints")

    def model_config(self) -> CoCaConfig:
        return self.model.build()

    def layout_dp(self, world_size: int) -> int:
        """The data-parallel degree of `parallel` over `world_size` ranks; ValueError when the degrees do not fit."""
        return infer_dp(self.parallel.dp, self.parallel.tp, self.parallel.pp, world_size)

    def grad_accum_steps(self, dp_size: int) -> int:
        return self.schedule.global_batch_size // (self.schedule.micro_batch_size * dp_size)

    def validate(self, world_size: int | None = None) -> None:
        """Checks that need no process group (one ConfigError line each); with `world_size`, also the degrees and
        the batch split over the ranks."""
        _check_data_and_schedule(self.data, self.schedule)
        _check_optim(self.optim)
        _require(self.loss.negatives in ("micro", "global"),
                 f"loss.negatives must be 'micro' or 'global', got {self.loss.negatives!r}")
        _require(self.loss.negatives == "micro" or self.optim.contrastive_weight > 0,
                 "loss.negatives=global needs the contrastive loss, but optim.contrastive_weight is 0 (a "
                 "captioning-only run has no negatives: use loss.negatives=micro)")
        _check_parallel(self.parallel)
        _check_fault(self.fault)
        _require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        _require(self.checkpoint.every >= 0, f"checkpoint.every must be >= 0, got {self.checkpoint.every}")
        _require(self.checkpoint.keep >= 0, f"checkpoint.keep must be >= 0, got {self.checkpoint.keep}")
        _require(self.logging.log_every >= 1, f"logging.log_every must be >= 1, got {self.logging.log_every}")
        _require(self.eval.every >= 0, f"eval.every must be >= 0, got {self.eval.every}")
        check_sources(self.eval.val_sources, "eval.val_sources", weighted=False)
        _require(bool(self.logging.run_dir), "logging.run_dir is empty (default runs/{name})")
        self.model_config()  # model.flavor and model.overrides, one line each (ConfigError)
        if world_size is not None:
            try:
                dp = self.layout_dp(world_size)
            except ValueError as error:
                raise ConfigError(f"parallel: {error}") from None
            per_step = self.schedule.micro_batch_size * dp
            _require(self.schedule.global_batch_size % per_step == 0,
                     f"schedule.global_batch_size {self.schedule.global_batch_size} is not divisible by "
                     f"micro_batch_size {self.schedule.micro_batch_size} x dp {dp} = {per_step}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "JobConfig":
        config = cls()
        apply_nested(config, values)
        return config


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_data_and_schedule(d: DataConfig, s: ScheduleConfig) -> None:
    _require(d.num_workers >= 0, f"data.num_workers must be >= 0 (0 reads in the training process), got "
                                 f"{d.num_workers}")
    _require(d.shard_retries >= 0, f"data.shard_retries must be >= 0, got {d.shard_retries}")
    _require(math.isfinite(d.shard_timeout_s) and d.shard_timeout_s >= 0,
             f"data.shard_timeout_s must be >= 0 seconds (0: no timeout), got {d.shard_timeout_s}")
    _require(not (d.sources and d.train_shards), "data.sources and data.train_shards are both set: give one "
             "(data.train_shards is the one-source case)")
    check_sources(d.sources, "data.sources", weighted=True)
    _require(d.on_source_failure in ("stop", "drop"),
             f"data.on_source_failure must be 'stop' or 'drop', got {d.on_source_failure!r}")
    _require(bool(d.tokenizer), "data.tokenizer is empty: use 'clip-bpe' or the path of a SentencePiece .model")
    _require(s.steps >= 1, f"schedule.steps must be >= 1, got {s.steps}")
    _require(s.micro_batch_size >= 1, f"schedule.micro_batch_size must be >= 1, got {s.micro_batch_size}")
    _require(s.global_batch_size >= 1, f"schedule.global_batch_size must be >= 1, got {s.global_batch_size}")
    _require(s.warmup_steps >= 0, f"schedule.warmup_steps must be >= 0, got {s.warmup_steps}")
    _require(0.0 <= s.min_lr_ratio <= 1.0, f"schedule.min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}")
    _require(s.decay in ("cosine", "linear", "constant"),
             f"schedule.decay must be 'cosine', 'linear' or 'constant', got {s.decay!r}")


def _check_optim(o: OptimConfig) -> None:
    for name in ("lr", "weight_decay", "eps", "grad_clip", "contrastive_weight", "caption_weight"):
        _require(math.isfinite(getattr(o, name)), f"optim.{name} must be a finite number, got {getattr(o, name)}")
    _require(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    _require(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    _require(o.eps > 0, f"optim.eps must be > 0, got {o.eps}")
    _require(o.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables), got {o.grad_clip}")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
             f"optim.betas must be two numbers in [0, 1), got {list(o.betas)}")
    _require(o.contrastive_weight >= 0 and o.caption_weight >= 0 and o.contrastive_weight + o.caption_weight > 0,
             f"optim.contrastive_weight and optim.caption_weight must be >= 0 and not both 0, got "
             f"{o.contrastive_weight} and {o.caption_weight}")


def _check_parallel(p: ParallelConfig) -> None:
    _require(p.text_ahead >= -1, f"parallel.text_ahead must be -1 (cost model), 0 (off) or a positive count, "
                                 f"got {p.text_ahead}")
    _require(p.pipeline_split is None or len(p.pipeline_split) == max(p.pp, 1),
             f"parallel.pipeline_split {p.pipeline_split} lists {len(p.pipeline_split or [])} stages but "
             f"parallel.pp={p.pp} (null lets the cost model split)")
    _require(p.precision in ("auto", "bf16", "fp32"),
             f"parallel.precision must be 'auto', 'bf16' or 'fp32', got {p.precision!r}")


def _check_fault(f: FaultConfig) -> None:
    _require(f.max_bad_steps >= 1, f"fault.max_bad_steps must be >= 1, got {f.max_bad_steps}")
    _require(math.isfinite(f.loss_spike_factor) and (f.loss_spike_factor == 0 or f.loss_spike_factor > 1),
             f"fault.loss_spike_factor must be 0 (off) or > 1, got {f.loss_spike_factor}")
    _require(f.loss_spike_window >= 1, f"fault.loss_spike_window must be >= 1, got {f.loss_spike_window}")
    _require(math.isfinite(f.collective_timeout_s) and f.collective_timeout_s > 0,
             f"fault.collective_timeout_s must be > 0 seconds, got {f.collective_timeout_s}")
    _require(math.isfinite(f.watchdog_timeout_s) and 0 <= f.watchdog_timeout_s < f.collective_timeout_s,
             f"fault.watchdog_timeout_s must be >= 0 (0: off) and below fault.collective_timeout_s "
             f"{f.collective_timeout_s:g} (the watchdog must fire first to name the stalled rank), got "
             f"{f.watchdog_timeout_s}")
    for key in ("rendezvous_timeout_s", "build_timeout_s", "resume_timeout_s", "first_step_timeout_s",
                "eval_timeout_s", "save_timeout_s"):
        value = getattr(f, key)
        _require(math.isfinite(value) and value >= 0, f"fault.{key} must be >= 0 seconds (0: not timed), got {value}")
    _require(math.isfinite(f.straggler_factor) and (f.straggler_factor == 0 or f.straggler_factor > 1),
             f"fault.straggler_factor must be 0 (off) or > 1, got {f.straggler_factor}")
    _require(f.replica_check_every >= 0, f"fault.replica_check_every must be >= 0 (0: off), got "
                                         f"{f.replica_check_every}")
