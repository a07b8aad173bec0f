"""The time model held to stored measurements (issue 26): a calibrated CPU profile (data/cpu2_profile.json, from
`megacoca plan --calibrate --ranks 2` on the project's 2-core box) and the measured step times of real training
steps of the planner's fit set on that box (data/step_times.json, from benchmarks/plan_measure.py: the slowest rank's
median step). Not a timed test: nothing runs but the model, so it fails when the model drifts from what was measured,
never because the machine is busy. When the time model changes on purpose, re-measure both files (the commands are
in data/step_times.json) and say so in docs/benchmarks.md."""

import json
import math
import os
import shlex

import pytest

from megacoca.cli import main as cli
from megacoca.config.model import CoCaConfig
from megacoca.plan.job import job_inputs
from megacoca.plan.profile import DeviceProfile
from megacoca.plan.timing import predict_time

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
PROFILE = DeviceProfile.load(os.path.join(DATA, "cpu2_profile.json"))
with open(os.path.join(DATA, "step_times.json")) as _f:
    RECORD = json.load(_f)
ROWS = RECORD["rows"]


def _predicted(row: dict) -> float:
    cfg = CoCaConfig.from_dict(RECORD["models"][row["model"]])
    layout, _ = job_inputs(row["overrides"], row["world_size"], cfg)
    return predict_time(cfg, layout, PROFILE).seconds


@pytest.mark.parametrize("row", ROWS, ids=[f"{r['model']}-{r['layout']}" for r in ROWS])
def test_each_layout_stays_where_it_was_recorded(row):
    """Each layout's predicted / measured ratio within 0.1 of the ratio recorded with the files: a model change that
    moves one layout's prediction by a tenth of its measured step fails here."""
    ratio = _predicted(row) / row["measured_s"]
    assert ratio == pytest.approx(row["recorded_ratio"], abs=0.1), (row["layout"], ratio, row["recorded_ratio"])


def test_the_whole_set_stays_as_close_as_recorded():
    """As many layouts within 25% of their measured step as when recorded (17 of 18), and the mean of
    |log(predicted / measured)| over the set no worse than recorded (+ 0.02)."""
    ratios = [_predicted(row) / row["measured_s"] for row in ROWS]
    assert sum(abs(r - 1) <= 0.25 for r in ratios) >= RECORD["recorded_within_25_percent"]
    errors = [abs(math.log(r)) for r in ratios]
    assert sum(errors) / len(errors) <= RECORD["recorded_mean_abs_log_ratio"] + 0.02


@pytest.mark.parametrize("name", ["small-dp2_zero3_bf16_ac", "small-pp2_zero1_bf16", "tiny-tp2_zero1_bf16"])
def test_plan_layout_predicts_the_measured_peak_of_every_rank(name, tmp_path, capsys):
    """`megacoca plan --layout` as benchmarks/plan_measure.py wrote it for the measured run: every rank's stored peak
    within 10% (the issue's bound; 2.0% over the whole set when recorded)."""
    row = next(r for r in ROWS if f"{r['model']}-{r['layout']}" == name)
    out = tmp_path / "plan.json"
    argv = shlex.split(row["plan"])[1:] + ["--cluster", os.path.join(DATA, "cpu2_profile.json"), "--json", str(out)]
    assert cli(argv) == 0, capsys.readouterr()
    stages = json.loads(out.read_text())["stages"]
    for rank in row["peaks"]:
        stage = stages[rank["pp_rank"]]
        assert rank["rank"] in stage["ranks"]
        assert stage["peak"] == pytest.approx(rank["peak_bytes"], rel=0.10), (name, rank)
