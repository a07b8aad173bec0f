"""DeepSpeed JSON loading: engine settings from ds_configs/, batch/precision/clipping derived from the job."""

import glob
import json
import os

import pytest

from megacoca.config.deepspeed import REPO_DS_CONFIGS, build_deepspeed_config, load_json, resolve_path
from megacoca.config.recipes import build_config
from megacoca.config.train import ConfigError

DERIVED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")
NAMES = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(REPO_DS_CONFIGS, "*.json")))


def test_expected_files_exist():
    assert {"zero0_fp32", "zero1_bf16", "zero2_bf16", "zero3_bf16", "zero3_bf16_offload", "zero3_fp32"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_ds_configs_hold_engine_settings_only(name):
    ds = load_json(name)
    assert not set(DERIVED) & set(ds), f"{name} sets a field megacoca derives"
    assert "optimizer" not in ds and "scheduler" not in ds
    stage = int(name[4])
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["bf16"]["enabled"] == ("bf16" in name)


@pytest.mark.parametrize("name", NAMES)
def test_derived_fields(name):
    job = build_config(overrides=[f"parallel.deepspeed_config={name}", "schedule.global_batch_size=48",
                                  "schedule.micro_batch_size=6", "optim.grad_clip=0.5"])
    ds = build_deepspeed_config(job, dp_size=4)
    assert ds["train_batch_size"] == 48
    assert ds["train_micro_batch_size_per_gpu"] == 6
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] == ("bf16" in name)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 4


def test_name_and_path_resolution(tmp_path):
    assert os.path.samefile(resolve_path("zero3_bf16"), os.path.join(REPO_DS_CONFIGS, "zero3_bf16.json"))
    with pytest.raises(ConfigError, match="no such file or ds_configs name 'zero9' \\(available: zero0_fp32"):
        resolve_path("zero9")


def _job_with_json(tmp_path, values, *overrides):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(values))
    return build_config(overrides=[f"parallel.deepspeed_config={path}", "schedule.global_batch_size=32",
                                   "schedule.micro_batch_size=8", *overrides])


def test_agreeing_batch_fields_are_accepted(tmp_path):
    job = _job_with_json(tmp_path, {"zero_optimization": {"stage": 2}, "train_batch_size": 32,
                                    "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2})
    assert build_deepspeed_config(job, dp_size=2)["gradient_accumulation_steps"] == 2


@pytest.mark.parametrize("field, value, derived", [
    ("train_batch_size", 64, 32), ("train_micro_batch_size_per_gpu", 4, 8), ("gradient_accumulation_steps", 1, 2),
    ("gradient_clipping", 5.0, 1.0),
])
def test_disagreeing_fields_are_errors(tmp_path, field, value, derived):
    job = _job_with_json(tmp_path, {"zero_optimization": {"stage": 2}, field: value})
    with pytest.raises(ConfigError, match=f"DeepSpeed config sets {field}={value} but the job derives {derived}"):
        build_deepspeed_config(job, dp_size=2)


def test_non_divisible_batch(tmp_path):
    job = _job_with_json(tmp_path, {})
    with pytest.raises(ConfigError, match="global_batch_size 32 is not divisible by micro_batch_size 8 x dp 3"):
        build_deepspeed_config(job, dp_size=3)


def test_precision(tmp_path):
    auto = build_config(overrides=["parallel.deepspeed_config=zero3_fp32"])
    assert build_deepspeed_config(auto, 1)["bf16"]["enabled"] is False
    bare = _job_with_json(tmp_path, {"zero_optimization": {"stage": 1}}, "parallel.precision=bf16")
    assert build_deepspeed_config(bare, 1)["bf16"]["enabled"] is True
    clash = build_config(overrides=["parallel.deepspeed_config=zero3_fp32", "parallel.precision=bf16"])
    with pytest.raises(ConfigError, match="parallel.precision=bf16 but zero3_fp32 has bf16.enabled=False"):
        build_deepspeed_config(clash, 1)
    fp16 = _job_with_json(tmp_path, {"fp16": {"enabled": True}})
    with pytest.raises(ConfigError, match="enables fp16"):
        build_deepspeed_config(fp16, 1)


def test_optimizer_section_rejected(tmp_path):
    job = _job_with_json(tmp_path, {"optimizer": {"type": "AdamW"}})
    with pytest.raises(ConfigError, match="has an 'optimizer' section"):
        build_deepspeed_config(job, 1)


def test_deepspeed_overrides_from_set_and_file(tmp_path):
    job = build_config(overrides=[
        "parallel.deepspeed_config=zero3_bf16",
        "parallel.deepspeed_overrides.zero_optimization.stage3_param_persistence_threshold=0",
        "parallel.deepspeed_overrides.zero_optimization={reduce_bucket_size: 1000}",
        "parallel.deepspeed_overrides.comms_logger.enabled=true"])
    assert job.parallel.deepspeed_overrides == {"zero_optimization.stage3_param_persistence_threshold": 0,
                                                "zero_optimization.reduce_bucket_size": 1000,
                                                "comms_logger.enabled": True}
    ds = build_deepspeed_config(job, dp_size=2)
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000
    assert ds["zero_optimization"]["stage"] == 3 and ds["comms_logger"] == {"enabled": True}
    assert load_json("zero3_bf16")["zero_optimization"]["stage3_param_persistence_threshold"] == 100000  # file kept

    path = tmp_path / "job.yaml"
    path.write_text("parallel:\n  deepspeed_overrides:\n    zero_optimization: {stage3_param_persistence_threshold: 0}\n")
    assert build_config(config_file=str(path)).parallel.deepspeed_overrides == {
        "zero_optimization.stage3_param_persistence_threshold": 0}


@pytest.mark.parametrize("override, message", [
    ("train_batch_size=4", "megacoca derives this"),
    ("bf16.enabled=false", "megacoca derives this"),
    ("optimizer.type=Adam", "megacoca derives this"),
    ("zero_optimization.stage.x=1", "'stage' is a value in the DeepSpeed config, not a section"),
])
def test_deepspeed_overrides_refuse_derived_keys(override, message):
    job = build_config(overrides=[f"parallel.deepspeed_overrides.{override}"])
    with pytest.raises(ConfigError, match=message) as error:
        build_deepspeed_config(job, dp_size=1)
    assert "\n" not in str(error.value)
