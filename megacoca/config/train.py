"""JobConfig: everything about a training run except the model's shapes, and the named recipes.

A run is a recipe (a Python function below, derived from another by small changes), optionally a YAML/JSON
file of nested overrides, then `--set section.key=value` overrides, in that order. Every bad key or value
is a `ConfigError` with one line that names it, raised before any process group exists.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from megacoca.config.model import CoCaConfig


class ConfigError(ValueError):
    """A bad job configuration: the message is one line and names the key or value at fault."""


@dataclass
class ModelChoice:
    flavor: str = "coca_tiny"  # a name from megacoca.config.flavors.FLAVORS
    overrides: dict[str, Any] = field(default_factory=dict)  # CoCaConfig fields to change

    def build(self) -> CoCaConfig:
        from megacoca.config.flavors import get_flavor

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
class EvalConfig:
    every: int = 0  # steps between calls of the trainer's eval hook; 0 disables


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
    # Without a pipeline: run the unimodal text tower on a CUDA side stream while the image tower runs ("auto":
    # where megacoca.parallel.overlap.overlap_is_safe says so; "off": never)
    overlap_text_tower: Literal["auto", "off"] = "auto"
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
    # Hung ranks (megacoca.launch.watchdog): every collective and the rendezvous give up after
    # collective_timeout_s; a train step (not the first, not eval or a save) making no progress for
    # watchdog_timeout_s ends the job, naming the stalled rank (0: no watchdog). The watchdog must be the shorter.
    collective_timeout_s: float = 1800.0
    watchdog_timeout_s: float = 600.0
    # Name a rank whose step time exceeds straggler_factor x the median rank's, every log interval
    # (megacoca.metrics.stragglers; 0: off).
    straggler_factor: float = 1.5


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

    def grad_accum_steps(self, dp_size: int) -> int:
        return self.schedule.global_batch_size // (self.schedule.micro_batch_size * dp_size)

    def validate(self, world_size: int | None = None) -> None:
        """Checks that need no process group; with `world_size`, also the batch split over ranks."""
        s, o, p, d = self.schedule, self.optim, self.parallel, self.data

        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        require(d.num_workers >= 0, f"data.num_workers must be >= 0 (0 reads in the training process), got "
                                    f"{d.num_workers}")
        require(d.shard_retries >= 0, f"data.shard_retries must be >= 0, got {d.shard_retries}")
        require(math.isfinite(d.shard_timeout_s) and d.shard_timeout_s >= 0,
                f"data.shard_timeout_s must be >= 0 seconds (0: no timeout), got {d.shard_timeout_s}")
        require(bool(d.tokenizer), "data.tokenizer is empty: use 'clip-bpe' or the path of a SentencePiece .model")
        require(s.steps >= 1, f"schedule.steps must be >= 1, got {s.steps}")
        require(s.micro_batch_size >= 1, f"schedule.micro_batch_size must be >= 1, got {s.micro_batch_size}")
        require(s.global_batch_size >= 1, f"schedule.global_batch_size must be >= 1, got {s.global_batch_size}")
        require(s.warmup_steps >= 0, f"schedule.warmup_steps must be >= 0, got {s.warmup_steps}")
        require(0.0 <= s.min_lr_ratio <= 1.0, f"schedule.min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}")
        require(s.decay in ("cosine", "linear", "constant"),
                f"schedule.decay must be 'cosine', 'linear' or 'constant', got {s.decay!r}")
        for name in ("lr", "weight_decay", "eps", "grad_clip", "contrastive_weight", "caption_weight"):
            require(math.isfinite(getattr(o, name)), f"optim.{name} must be a finite number, got {getattr(o, name)}")
        require(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
        require(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
        require(o.eps > 0, f"optim.eps must be > 0, got {o.eps}")
        require(o.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables), got {o.grad_clip}")
        require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
                f"optim.betas must be two numbers in [0, 1), got {list(o.betas)}")
        require(o.contrastive_weight >= 0 and o.caption_weight >= 0 and o.contrastive_weight + o.caption_weight > 0,
                f"optim.contrastive_weight and optim.caption_weight must be >= 0 and not both 0, got "
                f"{o.contrastive_weight} and {o.caption_weight}")
        require(p.text_ahead >= -1, f"parallel.text_ahead must be -1 (cost model), 0 (off) or a positive count, "
                                    f"got {p.text_ahead}")
        require(p.pipeline_split is None or len(p.pipeline_split) == max(p.pp, 1),
                f"parallel.pipeline_split {p.pipeline_split} lists {len(p.pipeline_split or [])} stages but "
                f"parallel.pp={p.pp} (null lets the cost model split)")
        require(p.precision in ("auto", "bf16", "fp32"),
                f"parallel.precision must be 'auto', 'bf16' or 'fp32', got {p.precision!r}")
        require(self.checkpoint.every >= 0, f"checkpoint.every must be >= 0, got {self.checkpoint.every}")
        require(self.checkpoint.keep >= 0, f"checkpoint.keep must be >= 0, got {self.checkpoint.keep}")
        require(self.logging.log_every >= 1, f"logging.log_every must be >= 1, got {self.logging.log_every}")
        require(self.eval.every >= 0, f"eval.every must be >= 0, got {self.eval.every}")
        f = self.fault
        require(f.max_bad_steps >= 1, f"fault.max_bad_steps must be >= 1, got {f.max_bad_steps}")
        require(math.isfinite(f.loss_spike_factor) and (f.loss_spike_factor == 0 or f.loss_spike_factor > 1),
                f"fault.loss_spike_factor must be 0 (off) or > 1, got {f.loss_spike_factor}")
        require(f.loss_spike_window >= 1, f"fault.loss_spike_window must be >= 1, got {f.loss_spike_window}")
        require(math.isfinite(f.collective_timeout_s) and f.collective_timeout_s > 0,
                f"fault.collective_timeout_s must be > 0 seconds, got {f.collective_timeout_s}")
        require(math.isfinite(f.watchdog_timeout_s) and 0 <= f.watchdog_timeout_s < f.collective_timeout_s,
                f"fault.watchdog_timeout_s must be >= 0 (0: off) and below fault.collective_timeout_s "
                f"{f.collective_timeout_s:g} (the watchdog must fire first to name the stalled rank), got "
                f"{f.watchdog_timeout_s}")
        require(math.isfinite(f.straggler_factor) and (f.straggler_factor == 0 or f.straggler_factor > 1),
                f"fault.straggler_factor must be 0 (off) or > 1, got {f.straggler_factor}")
        require(bool(self.logging.run_dir), "logging.run_dir is empty (default runs/{name})")
        self.model_config()  # model.flavor and model.overrides, one line each (ConfigError)
        if world_size is not None:
            from megacoca.parallel.dims import ParallelDims

            try:
                dims = ParallelDims.from_config(p, world_size)
            except ValueError as error:
                raise ConfigError(f"parallel: {error}") from None
            per_step = s.micro_batch_size * dims.dp_size
            require(s.global_batch_size % per_step == 0,
                    f"schedule.global_batch_size {s.global_batch_size} is not divisible by micro_batch_size "
                    f"{s.micro_batch_size} x dp {dims.dp_size} = {per_step}")
            if dims.pp_size > 1:
                from megacoca.parallel.pipeline.split import check_pipeline

                try:
                    check_pipeline(self.model_config(), dims.pp_size, s.global_batch_size // per_step,
                                   p.pipeline_split)
                except ValueError as error:
                    raise ConfigError(str(error)) from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "JobConfig":
        config = cls()
        apply_nested(config, values)
        return config


# ---------------------------------------------------------------------------------------------- recipes

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
    """The demo: a tiny CoCa learning synth-shapes on a laptop CPU in minutes (2 ranks, ZeRO-3, bf16).

    Every parameter is partitioned over the ranks (persistence threshold 0): the stock ZeRO-3 files keep tensors
    under 100k elements whole on every rank, which is every tensor of coca_tiny, so the demo would otherwise run
    ZeRO-3 without sharding anything. Partitioned, it is also faster here (286 vs 228 samples/s, 2 CPU ranks)."""
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


# ----------------------------------------------------------------------------- files and --set overrides


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
            import yaml

            values = yaml.safe_load(text)
    except Exception as error:  # the parser's message, on one line
        raise ConfigError(f"cannot parse {path}: {' '.join(str(error).split())}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(values).__name__}")
    return values


def parse_set(assignment: str) -> tuple[str, Any]:
    """`section.key=value` -> (`section.key`, value parsed as YAML: 3, 1e-4, true, [0.9, 0.95], null)."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE (e.g. schedule.steps=10), got {assignment!r}")
    import yaml

    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def parse_model_overrides(assignments: list[str], where: str) -> dict[str, Any]:
    """`FIELD=VALUE` strings (e.g. `megacoca eval --model-set`) -> CoCaConfig overrides, each field name and value
    checked against CoCaConfig's fields and types; a bad one is a one-line ConfigError naming `where`."""
    overrides = {}
    for assignment in assignments:
        name, sep, _ = assignment.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"{where} expects FIELD=VALUE (e.g. vocab_size=512), got {assignment!r}")
        name, value = parse_set(assignment)
        overrides[name] = _check_model_override(name, value, f"{where} {name}")
    return overrides


def build_config(recipe_name: str | None = None, config_file: str | None = None,
                 overrides: list[str] = ()) -> JobConfig:
    """recipe -> file -> --set overrides, each layer checked against the dataclass fields."""
    file_values = load_file(config_file) if config_file else {}
    recipe_name = recipe_name or file_values.pop("recipe", None) or "coca_tiny_cpu"
    file_values.pop("recipe", None)
    config = get_recipe(recipe_name)
    apply_nested(config, file_values, where=config_file or "")
    for assignment in overrides:
        key, value = parse_set(assignment)
        set_key(config, key, value, where="--set")
    config.validate()
    return config


def apply_nested(root: Any, values: dict, prefix: str = "", where: str = "") -> None:
    """Apply a nested mapping of overrides key by key, so each bad key is named with its full path."""
    for key, value in values.items():
        path = f"{prefix}{key}"
        target = _lookup(root, path, where) if not path.startswith(DEEPSPEED_OVERRIDES + ".") else None
        if isinstance(value, dict) and (dataclasses.is_dataclass(target) or isinstance(target, dict)) \
                and path != DEEPSPEED_OVERRIDES:
            apply_nested(root, value, prefix=f"{path}.", where=where)
        else:
            set_key(root, path, value, where=where)


def _label(key: str, where: str) -> str:
    if where.startswith("--"):
        return f"{where} {key}"
    return f"{where}: {key}" if where else key


def _lookup(root: Any, key: str, where: str = "", label: str | None = None) -> Any:
    obj = root
    for i, part in enumerate(key.split(".")):
        if isinstance(obj, dict):
            obj = obj.get(part)
            continue
        _check_key(obj, part, ".".join(key.split(".")[: i + 1]), label or _label(key, where))
        obj = getattr(obj, part)
    return obj


DEEPSPEED_OVERRIDES = "parallel.deepspeed_overrides"


def flatten_keys(values: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested DeepSpeed JSON keys as dotted paths."""
    flat = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_keys(value, path + "."))
        else:
            flat[path] = value
    return flat


def _set_deepspeed_override(root: Any, key: str, value: Any, label: str) -> None:
    """`parallel.deepspeed_overrides[.json.path]` = value: kept flat as dotted DeepSpeed JSON paths."""
    overrides = root.parallel.deepspeed_overrides
    path = key[len(DEEPSPEED_OVERRIDES) + 1:]
    if not path:  # the whole mapping at once (a config file, or --set parallel.deepspeed_overrides={...})
        if not isinstance(value, dict):
            raise ConfigError(f"{label}: expected a mapping of DeepSpeed JSON keys, got {value!r}")
        root.parallel.deepspeed_overrides = flatten_keys(value)
        return
    if isinstance(value, dict) and value:
        overrides.update(flatten_keys(value, path + "."))
    else:
        overrides[path] = value


def set_key(root: Any, key: str, value: Any, where: str = "") -> None:
    """Set a dotted key (`optim.lr`, `model.overrides.vision_width`) with type checking and one-line errors."""
    label = _label(key, where)
    if (key == DEEPSPEED_OVERRIDES or key.startswith(DEEPSPEED_OVERRIDES + ".")) and isinstance(root, JobConfig):
        _set_deepspeed_override(root, key, value, label)
        return
    parent_key, _, last = key.rpartition(".")
    obj = _lookup(root, parent_key, where, label) if parent_key else root
    if isinstance(obj, dict):
        if isinstance(getattr(root, "model", None), ModelChoice) and obj is root.model.overrides:
            value = _check_model_override(last, value, label)
        obj[last] = value
        return
    _check_key(obj, last, key, label)
    current = getattr(obj, last)
    if dataclasses.is_dataclass(current):
        first = dataclasses.fields(current)[0].name
        raise ConfigError(f"{label}: is a section, not a value; set one of its keys, e.g. {key}.{first}")
    hint = typing.get_type_hints(type(obj))[last]
    setattr(obj, last, coerce(value, hint, label))


def _check_model_override(name: str, value: Any, label: str) -> Any:
    if name not in {f.name for f in dataclasses.fields(CoCaConfig)}:
        raise ConfigError(f"unknown CoCaConfig field in {label!r}")
    return coerce(value, typing.get_type_hints(CoCaConfig)[name], label)


def _check_key(obj: Any, key: str, path: str, label: str) -> None:
    if not dataclasses.is_dataclass(obj):
        raise ConfigError(f"{label}: {path.rpartition('.')[0]} is a value, not a section")
    names = [f.name for f in dataclasses.fields(obj)]
    if key not in names:
        raise ConfigError(f"unknown config key {label!r}: no {key!r} here (known: {', '.join(names)})")


def coerce(value: Any, hint: Any, label: str) -> Any:
    """Check/convert a parsed value to a field's annotation; one-line ConfigError when it does not fit."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)

    def fail() -> typing.NoReturn:
        raise ConfigError(f"{label}: expected {_type_name(hint)}, got {value!r}")

    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, label)
            except ConfigError:
                pass
        fail()
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{label}: must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        fail()
    if hint is int:
        if isinstance(value, bool):
            fail()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                fail()
            if number.is_integer():
                return int(number)
        fail()
    if hint is float:
        if isinstance(value, bool):
            fail()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                fail()
        fail()
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        fail()
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            fail()
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                fail()
            return tuple(coerce(v, a, label) for v, a in zip(value, args))
        inner = args[0] if args else Any
        return origin(coerce(v, inner, label) for v in value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            fail()
        return dict(value)
    return value


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list):
        return f"a list of {len(args)} numbers" if origin is tuple else "a list"
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))
