"""slurm/common.sh's run_with_requeue without a cluster: a stand-in `scontrol` on PATH answers the allocation
questions and refuses the first requeues, as slurmctld can while the job's step is still being cleaned up. The
real requeue is tested on a real cluster in tests/e2e/test_slurm.py."""

import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1 $2" in
  "show hostnames") echo "$FAKE_HOST" ;;
  "show node") ;;
  "requeue "*)
    n=$(( $(cat "$FAKE_DIR/requeues" 2>/dev/null || echo 0) + 1 ))
    echo "$n" > "$FAKE_DIR/requeues"
    if (( n <= FAKE_REFUSALS )); then echo "scontrol: error: Job is in transitional state" >&2; exit 1; fi ;;
esac
"""


def _run_with_requeue(tmp_path, refusals, child_status=75):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "scontrol").write_text(FAKE_SCONTROL)
    (bindir / "scontrol").chmod(0o755)
    host = socket.gethostname()
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", FAKE_DIR=str(tmp_path),
               FAKE_HOST=host, FAKE_REFUSALS=str(refusals), SLURM_JOB_ID="7", SLURM_JOB_NODELIST=host,
               SLURMD_NODENAME="another-node", MEGACOCA_DIR=REPO, MEGACOCA_PYTHON=sys.executable,
               MEGACOCA_REQUEUE_WAIT_S="0")
    script = f"source slurm/common.sh && run_with_requeue bash -c 'exit {child_status}'"
    done = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    requeues = int((tmp_path / "requeues").read_text()) if (tmp_path / "requeues").exists() else 0
    return done, requeues


def test_a_refused_requeue_is_tried_again(tmp_path):
    done, requeues = _run_with_requeue(tmp_path, refusals=2)
    assert done.returncode == 0 and requeues == 3, done.stderr
    assert "requeueing job 7" in done.stdout


def test_a_requeue_refused_every_time_is_one_line_and_the_requeue_status(tmp_path):
    done, requeues = _run_with_requeue(tmp_path, refusals=99)
    assert done.returncode == 75 and requeues == 5
    assert done.stderr.strip().splitlines()[-1] == (
        "megacoca slurm: error: scontrol requeue 7 failed 5 times; the checkpoint is complete: submit the same "
        "job again (it resumes with --resume auto)")


def test_any_other_training_status_is_passed_on_without_a_requeue(tmp_path):
    done, requeues = _run_with_requeue(tmp_path, refusals=0, child_status=3)
    assert done.returncode == 3 and requeues == 0
    assert "training exited with status 3" in done.stdout
