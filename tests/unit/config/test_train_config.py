"""JobConfig: recipes, file loading and --set overrides with one-line errors naming the bad key/value."""

import json

import pytest

from megacoca.config.overrides import parse_set
from megacoca.config.recipes import RECIPES, build_config, get_recipe
from megacoca.config.train import ConfigError, JobConfig


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_build_and_validate(name):
    job = get_recipe(name)
    assert job.name == name
    job.validate()
    cfg = job.model_config()
    assert cfg.vision_layers >= 1


def test_recipes_are_derived_by_small_changes():
    tiny, base, giant = get_recipe("coca_tiny_cpu"), get_recipe("coca_base_a100"), get_recipe("coca_giant_a100")
    assert tiny.model.flavor == "coca_tiny" and tiny.parallel.deepspeed_config == "zero3_bf16"
    assert base.model.flavor == "coca_base" and base.schedule.global_batch_size == 4096
    assert giant.model.flavor == "coca_giant" and giant.schedule.global_batch_size == 65_536
    assert giant.parallel.activation_checkpointing
    assert giant.optim == base.optim  # the giant recipe only changes the model, batch and parallelism


def test_set_overrides_parse_types():
    job = build_config(overrides=["optim.lr=3e-4", "optim.betas=[0.9, 0.95]", "schedule.steps=7",
                                  "parallel.activation_checkpointing=true", "model.overrides.vision_width=64",
                                  "model.overrides.vision_heads=2", "checkpoint.resume=auto", "logging.run_dir=/tmp/x"])
    assert job.optim.lr == 3e-4 and isinstance(job.optim.lr, float)
    assert job.optim.betas == (0.9, 0.95)
    assert job.schedule.steps == 7
    assert job.parallel.activation_checkpointing and job.model_config().vision_width == 64
    assert job.checkpoint.resume == "auto" and job.run_dir == "/tmp/x"


@pytest.mark.parametrize("assignment, message", [
    ("optim.lrr=1", "unknown config key '--set optim.lrr'"),
    ("optimm.lr=1", "unknown config key '--set optimm.lr'"),
    ("optim.lr=fast", "--set optim.lr: expected float, got 'fast'"),
    ("schedule.steps=1.5", "--set schedule.steps: expected int, got 1.5"),
    ("schedule.decay=exponential", "--set schedule.decay: must be one of 'cosine', 'linear', 'constant'"),
    ("optim.betas=[0.9]", "--set optim.betas: expected a list of 2 numbers"),
    ("optim=1", "--set optim: is a section"),
    ("model.overrides.vision_widht=64", "unknown CoCaConfig field in '--set model.overrides.vision_widht'"),
    ("model.overrides.vision_width=wide", "--set model.overrides.vision_width: expected int"),
    ("schedule.steps", "--set expects KEY=VALUE"),
    ("schedule.steps=0", "schedule.steps must be >= 1"),
    ("parallel.precision=fp16", "--set parallel.precision: must be one of 'auto', 'bf16', 'fp32'"),
])
def test_bad_overrides_give_one_line_errors(assignment, message):
    with pytest.raises(ConfigError) as info:
        build_config(overrides=[assignment])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_recipe():
    with pytest.raises(ConfigError, match="unknown recipe 'nope' \\(known: coca_base_a100"):
        build_config("nope")


def test_yaml_and_json_files(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("recipe: coca_base_a100\noptim:\n  lr: 1.0e-4\nmodel:\n  overrides:\n    vision_layers: 2\n")
    job = build_config(config_file=str(yaml_file), overrides=["optim.lr=2e-4"])
    assert job.name == "coca_base_a100" and job.optim.lr == 2e-4  # --set wins over the file
    assert job.model_config().vision_layers == 2
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"schedule": {"steps": 3, "warmup_steps": 1}}))
    assert build_config(config_file=str(json_file)).schedule.steps == 3


def test_file_errors_name_file_and_key(tmp_path):
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("schedule:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=f"unknown config key '{bad_key}: schedule.stepz'"):
        build_config(config_file=str(bad_key))
    bad_value = tmp_path / "bad2.yaml"
    bad_value.write_text("optim:\n  weight_decay: lots\n")
    with pytest.raises(ConfigError, match="optim.weight_decay: expected float, got 'lots'"):
        build_config(config_file=str(bad_value))
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        build_config(config_file=str(broken))
    with pytest.raises(ConfigError, match="config file not found"):
        build_config(config_file=str(tmp_path / "missing.yaml"))


def test_non_divisible_batch_for_world_size():
    job = build_config(overrides=["schedule.global_batch_size=64", "schedule.micro_batch_size=16"])
    job.validate(world_size=2)  # 64 = 16 x 2 x accum 2
    with pytest.raises(ConfigError, match="global_batch_size 64 is not divisible by micro_batch_size 16 x dp 3 = 48"):
        job.validate(world_size=3)
    job.parallel.tp = 2
    with pytest.raises(ConfigError, match="parallel: world size 3 is not divisible by tp 2"):
        job.validate(world_size=3)


def test_unknown_flavor_is_a_config_error():
    with pytest.raises(ConfigError, match="model.flavor: unknown model flavor 'coca_huge'"):
        build_config(overrides=["model.flavor=coca_huge"])  # refused when the config is built, not later


def test_round_trip_through_dict():
    job = build_config("coca_base_a100", overrides=["optim.lr=1e-5", "model.overrides.text_layers=3"])
    again = JobConfig.from_dict(job.to_dict())
    assert again.to_dict() == job.to_dict()


def test_parse_set_values():
    assert parse_set("a.b=3") == ("a.b", 3)
    assert parse_set("a.b=null") == ("a.b", None)
    assert parse_set("a.b=x=y") == ("a.b", "x=y")


def test_the_demo_recipe_holds_the_demo_settings():
    """scripts/demo.sh runs `coca_tiny_shapes` with no overrides but the data paths: its settings live here."""
    demo = get_recipe("coca_tiny_shapes")
    assert demo.parallel.deepspeed_config == "zero3_fp32"
    assert demo.parallel.deepspeed_overrides == {"zero_optimization.stage3_param_persistence_threshold": 0}
    assert (demo.schedule.steps, demo.schedule.global_batch_size, demo.schedule.micro_batch_size) == (1200, 128, 64)
    assert (demo.schedule.decay, demo.schedule.min_lr_ratio) == ("linear", 0.1)
    assert demo.data.tokenizer == "data/shapes/tokenizer.model" and demo.eval.every > 0
    cfg = demo.model_config()
    assert cfg.context_length == 12 and cfg.pooler_layout == "paper" and cfg.image_size == 64
