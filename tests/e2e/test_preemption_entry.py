"""A preemption signal at any moment of a run, through the entry the launchers run (`python -m megacoca.train`, one
rank making its own group; `deepspeed --num_gpus 2 --module megacoca.train`): SIGUSR1 (MEGACOCA_FAULTS
signal_at=POINT) while the input is checked, while the run is built, while a checkpoint is written and while the
run resumes each ends with REQUEUE_EXIT_CODE, and the relaunched run (`--resume auto`) logs the same losses as a
run never interrupted. The step-level cases (a signal mid-training, on one rank of two) are
tests/distributed/test_preemption.py and tests/e2e/test_train_launchers.py."""

import json
import os
import socket
import subprocess
import sys

import pytest
from tiny_run import BIN, REPO, make_tiny_run

from megacoca.launch.preemption import REQUEUE_EXIT_CODE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("preemption_entry")
    make_tiny_run(root, env=_env())
    return root


def _env(faults: str = "") -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MEGACOCA_FAULTS")}
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    if faults:
        env["MEGACOCA_FAULTS"] = faults
    return env


def _args(data, run_dir) -> list[str]:
    return ["--config", str(data / "tiny.yaml"), "--train-shards", str(data / "shapes" / "train"),
            "--run-dir", str(run_dir), "--steps", "4", "--set", "checkpoint.every=2", "--set",
            "checkpoint.resume=auto"]


def _train(data, run_dir, faults: str = ""):
    """One rank, as `python -m megacoca.train` with no launcher."""
    return subprocess.run([sys.executable, "-m", "megacoca.train", *_args(data, run_dir)], cwd=REPO,
                          env=_env(faults), capture_output=True, text=True, timeout=300)


def _losses(run_dir) -> list[tuple[int, float]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [(r["step"], r["loss"]) for r in map(json.loads, open(path)) if "loss" in r]


def _checkpoints(run_dir) -> list[str]:
    folder = run_dir / "checkpoints"
    return sorted(name for name in os.listdir(folder) if name.startswith("step")) if folder.exists() else []


def test_a_signal_at_any_moment_of_one_rank_exits_75_and_the_relaunch_loses_nothing(data):
    whole = data / "whole"
    done = _train(data, whole)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = data / "cut"
    # while the input is checked, then while the run is built: no process group / no step yet, nothing written
    for point, says in (("check:begin", "before the model was built"), ("build:begin", "before the first step")):
        stopped = _train(data, run_dir, f"signal_at={point}")
        assert stopped.returncode == REQUEUE_EXIT_CODE, point + stopped.stdout[-3000:] + stopped.stderr[-3000:]
        assert f"preempted (SIGUSR1) {says}" in stopped.stdout, stopped.stdout[-3000:]
        assert _losses(run_dir) == [] and _checkpoints(run_dir) == [], point
    # while the first checkpoint (step 2) is written: it completes, the run stops after it
    stopped = _train(data, run_dir, "signal_at=save:after_model_states")
    assert stopped.returncode == REQUEUE_EXIT_CODE, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    assert "preempted (SIGUSR1): stopped after step 2" in stopped.stdout
    assert _checkpoints(run_dir) == ["step00000002"]
    assert (run_dir / "checkpoints" / "step00000002" / "COMPLETE").is_file()
    # the relaunch, while it resumes: it stops before its first step, at step 2
    stopped = _train(data, run_dir, "signal_at=resume:begin")
    assert stopped.returncode == REQUEUE_EXIT_CODE, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    assert "resumed from" in stopped.stdout and "before the first step, at step 2" in stopped.stdout
    assert [step for step, _ in _losses(run_dir)] == [1, 2]
    # the relaunch without a signal ends like the run never interrupted
    done = _train(data, run_dir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _losses(run_dir) == _losses(whole) and [step for step, _ in _losses(whole)] == [1, 2, 3, 4]


def test_a_signal_to_one_rank_before_its_process_group_stops_both_under_deepspeed(data):
    """Rank 1 alone gets SIGUSR1 while the input is checked (no process group yet): both ranks stop as soon as they
    have one, before building anything, and the launcher exits with REQUEUE_EXIT_CODE. (One rank of two signalled
    while the run is built: tests/distributed/test_preemption.py.)"""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    run_dir = data / "ds_check"
    stopped = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", port, "--module", "megacoca.train",
                              *_args(data, run_dir)], cwd=REPO, env=_env("signal_at=rank1@check:begin"),
                             capture_output=True, text=True, timeout=300)
    assert stopped.returncode == REQUEUE_EXIT_CODE, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    # rank 0, which got no signal, says it
    assert "preempted (another rank) before the model was built" in stopped.stdout, stopped.stdout[-3000:]
    assert _losses(run_dir) == [] and _checkpoints(run_dir) == []
