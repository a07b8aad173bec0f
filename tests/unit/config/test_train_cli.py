"""`megacoca train` / `python -m megacoca.train`: bad input is one line on stderr and exit code 2, before any
process group or model exists (in-process: these never reach training)."""

import json
import tarfile

import pytest

from megacoca.cli import build_parser
from megacoca.cli.train import main

TINY = ["--set", "schedule.steps=2", "--set", "schedule.global_batch_size=8", "--set", "schedule.micro_batch_size=4"]


@pytest.fixture
def shards(tmp_path):
    (tmp_path / "train").mkdir()
    for i in range(2):
        tarfile.open(tmp_path / "train" / f"{i:05d}.tar", "w").close()  # valid (empty) tars: the header is checked
    return str(tmp_path / "train")


@pytest.fixture(autouse=True)
def no_launcher_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def _error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megacoca train: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_key(capsys, shards):
    assert "unknown config key '--set optim.lrr'" in _error(capsys, ["--train-shards", shards, "--set", "optim.lrr=1"])


def test_bad_value(capsys, shards):
    assert "--set schedule.steps: expected int, got 'many'" in _error(
        capsys, ["--train-shards", shards, "--set", "schedule.steps=many"])


def test_missing_shards(capsys, tmp_path):
    err = _error(capsys, [*TINY, "--train-shards", str(tmp_path / "nowhere")])
    assert "data.train_shards" in err and "nowhere" in err


def test_no_shards_given(capsys):
    assert "data.train_shards is empty" in _error(capsys, [*TINY, "--train-shards", ""])


def test_non_divisible_batch(capsys, shards, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under a 2-rank launcher; rank 0 prints
    monkeypatch.setenv("RANK", "0")
    err = _error(capsys, [*TINY, "--train-shards", shards, "--set", "schedule.micro_batch_size=3"])
    assert "global_batch_size 8 is not divisible by micro_batch_size 3 x dp 2 = 6" in err


def test_other_ranks_exit_quietly(capsys, shards, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main([*TINY, "--train-shards", shards, "--set", "schedule.micro_batch_size=3"]) == 2
    assert capsys.readouterr().err == ""


def test_bad_deepspeed_config_and_resume(capsys, shards, tmp_path):
    assert "no such file or ds_configs name 'zero7'" in _error(capsys, [*TINY, "--train-shards", shards,
                                                                         "--ds-config", "zero7"])
    assert "checkpoint.resume: no checkpoint directory" in _error(
        capsys, [*TINY, "--train-shards", shards, "--resume", str(tmp_path / "ckpt")])


def test_too_few_shards_for_ranks(capsys, shards, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    err = _error(capsys, ["--train-shards", shards, "--set", "schedule.global_batch_size=16",
                          "--set", "schedule.micro_batch_size=4"])
    assert "2 shards cannot feed dp 4" in err


def test_print_config_and_recipes(capsys):
    assert main(["--recipe", "coca_base_a100", "--set", "optim.lr=1e-4", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["name"] == "coca_base_a100" and printed["optim"]["lr"] == 1e-4
    assert main(["--list-recipes"]) == 0
    assert "coca_giant_a100" in capsys.readouterr().out


def test_megacoca_train_subcommand_shares_the_parser():
    args = build_parser().parse_args(["train", "--recipe", "coca_tiny_cpu", "--set", "schedule.steps=3",
                                      "--steps", "4", "--local_rank=1"])
    assert args.command == "train" and args.overrides == ["schedule.steps=3"] and args.steps == 4
    assert args.func.__module__ == "megacoca.cli.train"


def test_missing_val_shards_when_eval_is_on(capsys, shards, tmp_path):
    err = _error(capsys, [*TINY, "--train-shards", shards, "--val-shards", str(tmp_path / "val"),
                          "--set", "eval.every=5"])
    assert "data.val_shards: shard not found" in err and "--set eval.every=0" in err


@pytest.mark.parametrize("world, sets, message", [
    (5, ["parallel.pp=5"], "parallel.pp=5: more stages than ViT blocks allow (3 blocks"),
    (2, ["parallel.pp=2", "schedule.global_batch_size=4"],
     "parallel.pp=2 needs at least 2 micro-batches per step, got 1"),
    (2, ["parallel.pp=2", "parallel.pipeline_split=[3,1]"], "parallel.pipeline_split [3, 1] places 4 ViT blocks"),
    (3, ["parallel.pp=3", "parallel.pipeline_split=[3,0,0]"], "parallel.pipeline_split [3, 0, 0] leaves stage 1 empty"),
    (4, ["parallel.pp=3"], "world size 4 is not divisible by tp 1 x pp 3"),
    (3, ["parallel.tp=3", "model.overrides.vision_heads=4"],
     "parallel.tp=3 cannot split the vision attention: vision_heads=4 is not divisible by 3"),
    (4, ["parallel.tp=4", "model.overrides.text_mlp_dim=510"],
     "parallel.tp=4 cannot split the text and multimodal decoder MLP: text_mlp_dim=510 is not divisible by 4"),
    (2, ["parallel.tp=4"], "tp 4 x pp 1 = 4 exceeds the world size 2"),
    (4, ["parallel.tp=2", "parallel.dp=3"], "dp 3 x pp 1 x tp 2 = 6 != world size 4"),
])
def test_layouts_the_model_cannot_take_are_one_line(capsys, shards, monkeypatch, world, sets, message):
    """Refused before any process group exists (this test runs with none), naming the layer and the numbers."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    args = [*TINY, "--set", f"schedule.global_batch_size={4 * world * 3}", "--train-shards", shards]
    for assignment in sets:
        args += ["--set", assignment]
    assert message in _error(capsys, args)
