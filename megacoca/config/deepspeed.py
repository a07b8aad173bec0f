"""DeepSpeed JSON configs: load one as DeepSpeed users write it, derive what the job already decides.

The files in ds_configs/ hold engine settings only (ZeRO stage, buckets, offload, precision). The batch
fields are derived from the JobConfig so that they can never disagree with the trainer:

    train_micro_batch_size_per_gpu = schedule.micro_batch_size
    gradient_accumulation_steps    = schedule.global_batch_size / (micro_batch_size x dp)
    train_batch_size               = schedule.global_batch_size

A JSON that sets one of them anyway must agree, or `ConfigError`. The same holds for precision
(`bf16.enabled`; fp16 is not supported) and `gradient_clipping` (from `optim.grad_clip`).

The bad-step guard (megacoca.step_guard) relies on DeepSpeed's optimizer refusing a step whose gradients are not
finite. Under ZeRO-1/2 two settings switch that off: `bf16.check_grad_overflow: false` (bf16: no check at all)
and `zero_optimization.compute_grad_norm: false` (fp32: the gradient norm is the only check; it is also the
`grad_norm` megacoca logs). A JSON that sets either to anything but true is refused with one line (GUARD_KEYS).
`gradient_clipping: 0` (`optim.grad_clip=0`) is fine: DeepSpeed computes the norm with clipping off too.

`parallel.deepspeed_overrides` (dotted JSON paths -> values) changes engine settings of the named file
without copying it, e.g. `zero_optimization.stage3_param_persistence_threshold: 0` so that ZeRO-3 partitions
a tiny model's tensors too (DeepSpeed keeps tensors under that threshold, 1e5 elements by default, whole on
every rank). The derived fields cannot be overridden this way.
"""

from __future__ import annotations

import copy
import difflib
import json
import os

from megacoca.config.train import ConfigError, JobConfig

REPO_DS_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                               "ds_configs")


def resolve_path(name_or_path: str) -> str:
    """A path as given, else a name in ds_configs/ (with or without `.json`), relative to cwd or the repo."""
    candidates = [name_or_path]
    if not name_or_path.endswith(".json"):
        candidates.append(name_or_path + ".json")
    for base in ("ds_configs", REPO_DS_CONFIGS):
        candidates += [os.path.join(base, c) for c in list(candidates[:2])]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    available = sorted(f[:-5] for f in os.listdir(REPO_DS_CONFIGS) if f.endswith(".json")) \
        if os.path.isdir(REPO_DS_CONFIGS) else []
    raise ConfigError(f"parallel.deepspeed_config: no such file or ds_configs name {name_or_path!r} "
                      f"(available: {', '.join(available)})")


def load_json(name_or_path: str) -> dict:
    path = resolve_path(name_or_path)
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise ConfigError(f"cannot parse DeepSpeed config {path}: {error}") from None
    except OSError as error:
        raise ConfigError(f"cannot read DeepSpeed config {path}: {error.strerror or error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"DeepSpeed config {path}: expected a JSON object")
    return values


def json_precision(ds: dict) -> str:
    if ds.get("fp16", {}).get("enabled", False):
        raise ConfigError("DeepSpeed config enables fp16; megacoca trains in bf16 or fp32 (set bf16.enabled)")
    return "bf16" if ds.get("bf16", {}).get("enabled", False) else "fp32"


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


# What the bad-step guard relies on, in the DeepSpeed JSON: key -> what setting it to false switches off.
GUARD_KEYS = {
    "bf16.check_grad_overflow": "the skip of a bf16 step whose gradients are not finite (ZeRO-1/2)",
    "zero_optimization.compute_grad_norm": "the gradient norm (logged; ZeRO-1/2 fp32 skips a bad step by it)",
}


def check_json(ds: dict, where: str) -> None:
    """The keys megacoca reads, and DeepSpeed's own model of the `zero_optimization` section, checked now:
    DeepSpeed would refuse a misspelt ZeRO key only in `deepspeed.initialize`, after the process group and
    the model exist. `where` names the file (and overrides) in the one-line error."""

    def fail(key: str, expected: str) -> None:
        value = ds
        for part in key.split("."):
            value = value[part]
        raise ConfigError(f"DeepSpeed config {where}: {key} must be {expected}, got {value!r}")

    for section in ("zero_optimization", "bf16", "fp16"):
        if section in ds and not isinstance(ds[section], dict):
            fail(section, "an object ({...})")
    for section in ("bf16", "fp16"):
        if "enabled" in ds.get(section, {}) and not isinstance(ds[section]["enabled"], bool):
            fail(f"{section}.enabled", "true or false")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        value = ds.get(key, "auto")
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, (int, float))):
            fail(key, "a number or \"auto\"")
    for key, what in GUARD_KEYS.items():
        section, name = key.split(".")
        if ds.get(section, {}).get(name, True) is not True:
            raise ConfigError(f"DeepSpeed config {where}: {key} must be true (or left out), got "
                              f"{ds[section][name]!r}: megacoca's bad-step guard relies on {what}")
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in (0, 1, 2, 3):
        fail("zero_optimization.stage", "0, 1, 2 or 3")
    for offload in ("offload_optimizer", "offload_param"):
        if offload in zero:
            if not isinstance(zero[offload], dict):
                fail(f"zero_optimization.{offload}", "an object ({\"device\": \"cpu\", ...})")
            if zero[offload].get("device", "none") not in (None, "none", "cpu", "nvme"):
                fail(f"zero_optimization.{offload}.device", "\"none\", \"cpu\" or \"nvme\"")
    # heavy (DeepSpeed imports torch): `megacoca --help` imports this module; only a check needs them
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(**zero)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(["zero_optimization", *(str(part) for part in first["loc"])])
        if first["type"] == "extra_forbidden":
            known = {name for name, f in DeepSpeedZeroConfig.model_fields.items() for name in (name, f.alias) if name}
            close = difflib.get_close_matches(str(first["loc"][-1]), sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"DeepSpeed config {where}: {key} is not a ZeRO setting DeepSpeed knows{hint}") from None
        raise ConfigError(f"DeepSpeed config {where}: {key}: {first['msg']} (got {first.get('input')!r})") from None


def build_deepspeed_config(job: JobConfig, dp_size: int, source: dict | None = None) -> dict:
    """The dict handed to `deepspeed.initialize(config=...)`: the JSON plus the derived fields."""
    ds = copy.deepcopy(source if source is not None else load_json(job.parallel.deepspeed_config))
    check_json(ds, job.parallel.deepspeed_config)
    if job.parallel.deepspeed_overrides:
        apply_overrides(ds, job.parallel.deepspeed_overrides)
        check_json(ds, f"{job.parallel.deepspeed_config} + parallel.deepspeed_overrides")
    s = job.schedule
    per_step = s.micro_batch_size * dp_size
    if s.global_batch_size % per_step:
        raise ConfigError(f"schedule.global_batch_size {s.global_batch_size} is not divisible by "
                          f"micro_batch_size {s.micro_batch_size} x dp {dp_size} = {per_step}")
    derived = {
        "train_batch_size": s.global_batch_size,
        "train_micro_batch_size_per_gpu": s.micro_batch_size,
        "gradient_accumulation_steps": s.global_batch_size // per_step,
        "gradient_clipping": float(job.optim.grad_clip),
    }
    for key, value in derived.items():
        if key in ds and ds[key] != "auto" and float(ds[key]) != float(value):
            raise ConfigError(f"DeepSpeed config sets {key}={ds[key]} but the job derives {value} "
                              f"(remove it from the JSON; megacoca derives it from the job config)")
        ds[key] = value

    in_json = json_precision(ds)
    wanted = job.parallel.precision
    if wanted == "auto":
        wanted = in_json
    elif "bf16" in ds and "enabled" in ds["bf16"] and in_json != wanted:
        raise ConfigError(f"parallel.precision={wanted} but {job.parallel.deepspeed_config} has "
                          f"bf16.enabled={ds['bf16']['enabled']}; pick a matching ds_configs file")
    ds.setdefault("bf16", {})["enabled"] = wanted == "bf16"
    ds.pop("fp16", None)

    for forbidden in ("optimizer", "scheduler"):
        if forbidden in ds:
            raise ConfigError(f"DeepSpeed config has an {forbidden!r} section; megacoca builds AdamW and the "
                              f"lr schedule from the job config (optim.*, schedule.*): remove it")
    return ds


DERIVED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping", "bf16.enabled", "fp16.enabled")


def apply_overrides(ds: dict, overrides: dict) -> None:
    """Set dotted paths (`zero_optimization.stage`) in the DeepSpeed dict, creating sections as needed."""
    for path, value in overrides.items():
        if path in DERIVED_KEYS or path.split(".")[0] in ("optimizer", "scheduler"):
            raise ConfigError(f"parallel.deepspeed_overrides.{path}: megacoca derives this from the job config "
                              "(schedule.*, optim.*, parallel.precision); set it there")
        *sections, last = path.split(".")
        node = ds
        for section in sections:
            child = node.setdefault(section, {})
            if not isinstance(child, dict):
                raise ConfigError(f"parallel.deepspeed_overrides.{path}: {section!r} is a value in the DeepSpeed "
                                  "config, not a section")
            node = child
        node[last] = value


def precision_dtype(ds: dict):
    import torch  # heavy: `megacoca --help` imports this module

    return torch.bfloat16 if ds.get("bf16", {}).get("enabled", False) else torch.float32


def offloads_optimizer(ds: dict) -> bool:
    device = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")
