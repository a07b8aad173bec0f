"""The chaos run (scripts/chaos_run.py) on one seed: 2 ranks through `megacoca train`'s code path, 40 steps, killed
with SIGKILL 3 times, preempted with SIGUSR1 twice, one rank stopped past the watchdog, a full disk during a save
and a NaN step, relaunched with `--resume auto` after each: its losses and final weights equal an uninterrupted
run's, bit for bit. The three-seed, 120-step runs and their tallies: docs/benchmarks.md."""

import importlib
import os

import pytest

pytestmark = pytest.mark.slow  # ~2 min (9 launches of 2 ranks): CI runs it (make test)


def test_a_chaos_run_ends_as_an_uninterrupted_one(tmp_path):
    chaos_run = importlib.import_module("scripts.chaos_run")  # by name: the forked ranks import it to find _rank
    seed = int(os.environ.get("MEGACOCA_TEST_SEED", "3"))
    tally = chaos_run.chaos(seed, 40, str(tmp_path))
    print(tally)
    assert tally["injected"] == tally["recovered"] == 7
    assert tally["same_losses"] and tally["same_weights"], tally
