"""Named recipes (a Python function each, derived from another by small changes) and `build_config`: recipe ->
file of nested overrides -> `--set` overrides, each layer checked against the dataclass fields."""

from __future__ import annotations

import json
import os
from typing import Callable

import yaml

from megacoca.config.overrides import ConfigError, apply_nested, parse_set, set_key
from megacoca.config.train import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    JobConfig,
    LoggingConfig,
    ModelChoice,
    OptimConfig,
    ParallelConfig,
    ScheduleConfig,
)

RECIPES: dict[str, Callable[[], JobConfig]] = {}


def recipe(fn: Callable[[], JobConfig]) -> Callable[[], JobConfig]:
    RECIPES[fn.__name__] = fn
    return fn


def get_recipe(name: str) -> JobConfig:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r} (known: {', '.join(sorted(RECIPES))})")
    config = RECIPES[name]()
    config.name = name
    return config


@recipe
def coca_tiny_cpu() -> JobConfig:
    """The default recipe: a tiny CoCa on synth-shapes on a laptop CPU in minutes (ZeRO-3, bf16, the CLIP BPE).

    Not the demo: `make demo` runs coca_tiny_shapes, derived from this one. Every parameter is partitioned over
    the ranks (persistence threshold 0): the stock ZeRO-3 files keep tensors under 100k elements whole on every
    rank, which is every tensor of coca_tiny, so the recipe would otherwise run ZeRO-3 without sharding anything.
    Partitioned, it is also faster (286 vs 228 samples/s on 2 CPU ranks, measured at the demo's settings:
    docs/benchmarks.md)."""
    return JobConfig(
        model=ModelChoice(flavor="coca_tiny"),
        data=DataConfig(train_shards="data/shapes/train", val_shards="data/shapes/val", tokenizer="clip-bpe"),
        optim=OptimConfig(lr=1e-3, weight_decay=0.05),
        schedule=ScheduleConfig(steps=300, global_batch_size=64, micro_batch_size=32, warmup_steps=20),
        checkpoint=CheckpointConfig(every=100),
        logging=LoggingConfig(log_every=10),
        eval=EvalConfig(every=100),
        parallel=ParallelConfig(deepspeed_config="zero3_bf16",
                                deepspeed_overrides={"zero_optimization.stage3_param_persistence_threshold": 0}),
    )


@recipe
def coca_tiny_shapes() -> JobConfig:
    """`make demo`: coca_tiny learning the synth-shapes data (scripts/demo.sh writes data/shapes) on 2 CPU ranks
    with every parameter partitioned by ZeRO-3, in under 10 minutes of training and evaluation (docs/benchmarks.md
    has the figures per seed). fp32: on a CPU it is as fast as bf16 here, and exact. Linear decay to a tenth of the
    peak: shape is learned late and at a seed-dependent step, and a cosine to zero left one seed in three short of
    it (zero-shot 0.83 where this schedule gives 0.95)."""
    config = coca_tiny_cpu()
    # single-object captions are <= 10 tokens with bos and eos
    config.model = ModelChoice(flavor="coca_tiny", overrides={"context_length": 12})
    config.data = DataConfig(train_shards="data/shapes/train", val_shards="data/shapes/val",
                             tokenizer="data/shapes/tokenizer.model")
    config.schedule = ScheduleConfig(steps=1200, global_batch_size=128, micro_batch_size=64, warmup_steps=50,
                                     decay="linear", min_lr_ratio=0.1)
    config.checkpoint = CheckpointConfig(every=0)
    config.eval = EvalConfig(every=300)
    config.parallel.deepspeed_config = "zero3_fp32"
    return config


@recipe
def coca_base_a100() -> JobConfig:
    """CoCa-Base (383M) at 288px on A100-80GB nodes: ZeRO-2 bf16, 4,096 samples per step."""
    config = coca_tiny_cpu()
    config.model = ModelChoice(flavor="coca_base")
    config.data = DataConfig(train_shards="", val_shards="", tokenizer="clip-bpe", num_workers=8)
    config.optim = OptimConfig(lr=8e-4, weight_decay=0.01, betas=(0.9, 0.999))
    config.schedule = ScheduleConfig(steps=100_000, global_batch_size=4096, micro_batch_size=128,
                                     warmup_steps=2000, decay="linear")
    config.checkpoint = CheckpointConfig(every=1000, keep=3)
    config.logging = LoggingConfig(log_every=10)
    config.eval = EvalConfig(every=5000)
    config.parallel = ParallelConfig(deepspeed_config="zero2_bf16")
    return config


@recipe
def coca_large_a100() -> JobConfig:
    config = coca_base_a100()
    config.model = ModelChoice(flavor="coca_large")
    config.schedule.micro_batch_size = 64
    config.parallel = ParallelConfig(deepspeed_config="zero3_bf16", activation_checkpointing=True)
    return config


@recipe
def coca_giant_a100() -> JobConfig:
    """The paper's 2.1B CoCa: ZeRO-3 bf16 with activation checkpointing, batch 65,536 as in the paper."""
    config = coca_large_a100()
    config.model = ModelChoice(flavor="coca_giant")
    config.schedule = ScheduleConfig(steps=500_000, global_batch_size=65_536, micro_batch_size=64,
                                     warmup_steps=10_000, decay="linear")
    return config


def load_file(path: str) -> dict:
    """A YAML or JSON file of nested overrides; a top-level `recipe: NAME` picks the base recipe."""
    if os.path.isdir(path):
        raise ConfigError(f"config file {path} is a directory")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else "not UTF-8 text"
        raise ConfigError(f"cannot read config file {path}: {reason}") from None
    try:
        if path.endswith(".json"):
            values = json.loads(text)
        else:
            values = yaml.safe_load(text)
    except Exception as error:  # the parser's message, on one line
        raise ConfigError(f"cannot parse {path}: {' '.join(str(error).split())}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(values).__name__}")
    return values


def build_config(recipe_name: str | None = None, config_file: str | None = None,
                 overrides: list[str] = ()) -> JobConfig:
    """recipe -> file -> --set overrides, each layer checked against the dataclass fields."""
    file_values = load_file(config_file) if config_file else {}
    recipe_name = recipe_name or file_values.pop("recipe", None) or "coca_tiny_cpu"
    file_values.pop("recipe", None)
    config = get_recipe(recipe_name)
    recipe_shards = config.data.train_shards
    apply_nested(config, file_values, where=config_file or "")
    for assignment in overrides:
        key, value = parse_set(assignment)
        set_key(config, key, value, where="--set")
    if config.data.sources and config.data.train_shards == recipe_shards:
        config.data.train_shards = ""  # a mixture replaces the recipe's one source (a user-set one is an error)
    config.validate()
    return config
