"""`megacoca plan` through its command line: a table of layouts that fit, the best one written as a config that
`megacoca train` accepts for that many GPUs, and one-line errors for bad input."""

import json

import pytest

from megacoca.cli import main as cli
from megacoca.config.recipes import build_config
from megacoca.parallel.dims import ParallelDims
from megacoca.parallel.parallelize import check_layout


def test_plan_prints_layouts_and_emits_a_config_train_accepts(tmp_path, capsys):
    out = tmp_path / "best.yaml"
    everything = tmp_path / "all.json"
    code = cli(["plan", "--flavor", "coca_base", "--cluster", "a100-40gb", "--gpus", "16", "--global-batch", "1024",
                "--top", "5", "--emit-config", str(out), "--json", str(everything)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "profile a100-40gb: preset" in printed and "| 1 |" in printed and "layouts fit" in printed
    plans = json.loads(everything.read_text())
    assert plans and all(item["peak_bytes"] <= 0.9 * 40e9 for item in plans)
    rates = [item["samples_per_s"] for item in plans]
    assert rates == sorted(rates, reverse=True)
    job = build_config(config_file=str(out))
    job.validate(16)
    dims = ParallelDims.from_config(job.parallel, 16)
    check_layout(job.model_config(), dims)
    best = plans[0]["layout"]
    assert (job.parallel.tp, job.parallel.pp, dims.dp_size) == (best["tp"], best["pp"], best["dp"])
    assert job.schedule.global_batch_size == 1024 and job.model.flavor == "coca_base"


def test_bad_input_is_one_line(capsys):
    assert cli(["plan", "--cluster", "no-such-gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown cluster profile 'no-such-gpu'" in err
    assert cli(["plan", "--gpus", "0"]) == 2
    assert "positive integer" in capsys.readouterr().err


def test_nothing_fits_says_so(capsys):
    assert cli(["plan", "--flavor", "coca_giant", "--gpus", "1", "--global-batch", "64", "--cluster",
                "a100-40gb"]) == 1
    assert "no layout fits" in capsys.readouterr().err


def test_a_pinned_layout_prints_every_stage_and_writes_it_as_json(tmp_path, capsys):
    from megacoca.config.flavors import get_flavor
    from megacoca.config.layout import Layout
    from megacoca.plan.memory import ZeroBuffers, predict

    out = tmp_path / "pinned.json"
    code = cli(["plan", "--flavor", "coca_tiny", "--set", "vision_layers=4", "--cluster", "h100", "--kernels", "torch",
                "--layout", "tp=2,pp=2,dp=2,micro=4,accum=3,ckpt=on,keep_gathered=on,text_ahead=1",
                "--deepspeed-config", "zero3_bf16", "--deepspeed-set",
                "zero_optimization.stage3_param_persistence_threshold=0", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "tp=2 pp=2 dp=2 ZeRO-3 bf16 micro=4 x accum 3 ckpt text-ahead 1 keep-gathered" in printed
    assert "| 0 | 4 (0, ...) |" in printed and "| 1 | 4 (2, ...) |" in printed and "step " in printed
    result = json.loads(out.read_text())
    layout = Layout(tp=2, pp=2, dp=2, zero_stage=3, micro_batch=4, grad_accum=3, checkpointing=True, text_ahead=1,
                    keep_gathered=True, kernels="torch")
    expected = predict(get_flavor("coca_tiny", vision_layers=4), layout, ZeroBuffers(persistence_threshold=0))
    assert [stage["peak"] for stage in result["stages"]] == [stage.peak for stage in expected]
    assert result["stages"][1]["ranks"] == [2, 3, 6, 7]  # (dp, pp, tp) with tp fastest
    for stage in result["stages"]:
        assert stage["peak"] == pytest.approx(sum(stage[k] for k in ("params", "grads", "optimizer", "activations",
                                                                       "transient")))
    assert result["layout"]["zero_stage"] == 3 and result["world"] == 8 and result["step_s"] > 0


def test_a_pinned_layout_takes_its_zero_stage_and_precision_from_the_deepspeed_config(capsys):
    assert cli(["plan", "--flavor", "coca_tiny", "--layout", "dp=2,micro=8", "--deepspeed-config", "zero3_fp32",
                "--cluster", "a100-40gb"]) == 0
    assert "tp=1 pp=1 dp=2 ZeRO-3 fp32 micro=8 x accum 1" in capsys.readouterr().out
    # dp and the accumulation from --gpus and --global-batch
    assert cli(["plan", "--flavor", "coca_tiny", "--layout", "zero=1,micro=8", "--gpus", "4",
                "--global-batch", "64"]) == 0
    assert "dp=4 ZeRO-1 bf16 micro=8 x accum 2" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--layout", "tp=5,dp=1,micro=2,zero=1"], "tp=5"),
    (["--layout", "pp=2,dp=1,micro=2,accum=1,zero=1"], "at least 2 micro-batches"),
    (["--layout", "dp=2,micro=4,zero=0"], "ZeRO-0 trains in fp32"),
    (["--layout", "dp=2,micro=4,zero=3,keep_gathered=on"], "needs zero=3 and pp > 1"),
    (["--layout", "dp=2,micro=4,zero=9"], "zero must be 0, 1, 2 or 3"),
    (["--layout", "dp=2,micro=4,zero=1,gpu=3"], "unknown key 'gpu'"),
    (["--layout", "dp=2,micro=4"], "give zero="),
    (["--layout", "dp=2,micro=four,zero=1"], "micro must be an integer"),
    (["--layout", "dp=2,micro=4,zero=1,ckpt=maybe"], "ckpt must be on or off"),
    (["--layout", "dp=2,micro=4,zero=1", "--gpus", "8"], "but --gpus says 8"),
    (["--layout", "dp=2,micro=4,accum=1,zero=1", "--global-batch", "12"], "but --global-batch says 12"),
    (["--layout", "dp=2,micro=4,zero=1", "--global-batch", "12"], "not a multiple of micro 4"),
    (["--layout", "dp=2,micro=4,zero=1", "--deepspeed-config", "zero3_bf16"], "zero=1, but the DeepSpeed config"),
    (["--layout", "dp=2,micro=4", "--deepspeed-config", "zero3_fp32", "--precision", "bf16"], "trains in fp32"),
    (["--layout", "dp=2,micro=4", "--deepspeed-config", "no_such_config"], "no such file"),
    (["--deepspeed-set", "zero_optimization.reduce_bucket_size"], "expected KEY=VALUE"),
    (["--memory-fraction", "7"], "must be in (0, 1]"),
    (["--memory-fraction", "0"], "must be in (0, 1]"),
    (["--memory-fraction", "nan"], "must be in (0, 1]"),
    (["--top", "0"], "positive integer"),
    (["--min-negatives", "-1"], "integer >= 0"),
    (["--gpus-per-node", "0"], "positive integer"),
    (["--global-batch", "1.5"], "positive integer"),
])
def test_bad_numbers_and_impossible_layouts_are_one_line_errors(argv, message, capsys):
    assert cli(["plan", "--flavor", "coca_base", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
