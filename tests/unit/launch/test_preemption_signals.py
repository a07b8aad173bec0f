"""megacoca.launch.preemption's watch without a process group, and the fault that sends its signal at a point
(MEGACOCA_FAULTS signal_at=POINT). Whole runs preempted at every moment: tests/distributed/test_preemption.py and
tests/e2e/test_preemption_entry.py."""

import os
import signal
import subprocess
import sys

import pytest

from megacoca.launch import faults
from megacoca.launch.preemption import PreemptionWatch


def test_signal_at_parses_like_the_other_point_kinds():
    parsed = faults.parse("signal_at=rank1@build:begin,resume:begin#2;kill_at=save:begin")
    assert parsed == {"signal_at": ["rank1@build:begin", "resume:begin#2"], "kill_at": ["save:begin"]}
    assert {"check:begin", "build:begin", "resume:begin"} <= set(faults.POINTS)


@pytest.mark.parametrize("text, message", [
    ("signal_at=build:middle", "signal_at=build:middle: unknown point 'build:middle'"),
    ("signal_at=2", "unknown point '2'"),  # a step is not a point
    ("signal_at=node1@build:begin", "is not rankR"),
    ("signal_at=", "is not kind=value"),
])
def test_bad_signal_at_is_a_one_line_error(text, message):
    with pytest.raises(faults.FaultSpecError, match=message) as info:
        faults.parse(text)
    assert "\n" not in str(info.value)


def test_signal_at_sends_sigusr1_that_the_watch_records(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv(faults.ENV, "signal_at=rank1@build:begin,resume:begin#2")
    before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    watch = PreemptionWatch().install()
    try:
        faults.point("build:begin")  # rank 1 only
        faults.point("resume:begin")  # the first time: not yet
        assert watch.received == [] and not watch.agreed("cpu")
        faults.point("resume:begin")
        assert watch.received == ["SIGUSR1"]
        assert watch.agreed("cpu")  # no process group: this rank's own flag
        os.kill(os.getpid(), signal.SIGTERM)  # the other signal, recorded alike
        assert watch.received == ["SIGUSR1", "SIGTERM"]
    finally:
        watch.uninstall()
    assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == before


def test_the_watch_is_installed_before_torch_is_imported():
    """megacoca.train installs it first: importing it must not pull in torch (seconds on a loaded machine)."""
    code = "import sys, megacoca.launch.preemption; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr
