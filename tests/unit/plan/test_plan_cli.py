"""`megacoca plan` through its command line: a table of layouts that fit, the best one written as a config that
`megacoca train` accepts for that many GPUs, and one-line errors for bad input."""

import json

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
