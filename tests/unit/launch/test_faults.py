"""megacoca.launch.faults: the MEGACOCA_FAULTS format, and points that do nothing unless named."""

import errno
import os
import signal

import pytest

from megacoca.launch import faults


def test_parse_kinds_ranks_and_counts():
    parsed = faults.parse(" kill_at=save:begin, rank1@save:after_rank_file#2 ;enospc_at=save:after_latest;")
    assert parsed == {"kill_at": ["save:begin", "rank1@save:after_rank_file#2"], "enospc_at": ["save:after_latest"]}
    assert faults._point_target("rank1@save:after_rank_file#2") == (1, "save:after_rank_file", 2)
    assert faults._point_target("save:begin") == (None, "save:begin", 1)


@pytest.mark.parametrize("text, message", [
    ("kill=save:begin", "kill=save:begin: expected \\[rankR@\\]STEP"),  # a point given to the step kind fails
    ("kil_at=save:begin", "unknown fault kind 'kil_at'"),  # a typo fails instead of testing nothing
    ("kill_at", "is not kind=value"),
    ("kill_at=", "is not kind=value"),
    ("kill_at=save:middle", "unknown point 'save:middle'"),
    ("kill_at=node1@save:begin", "is not rankR"),
    ("enospc_at=save:begin#x", "count after # is not a number"),
])
def test_bad_specs_are_one_line_errors(text, message):
    with pytest.raises(faults.FaultSpecError, match=message) as info:
        faults.parse(text)
    assert "\n" not in str(info.value) and str(info.value).startswith("MEGACOCA_FAULTS: ")


def test_points_are_inert_unless_named(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    for name in faults.POINTS:
        faults.point(name)
    monkeypatch.setenv(faults.ENV, "enospc_at=save:after_latest")
    faults.point("save:begin")  # another point: nothing
    with pytest.raises(OSError) as info:
        faults.point("save:after_latest")
    assert info.value.errno == errno.ENOSPC and "injected by MEGACOCA_FAULTS" in str(info.value)


def test_rank_and_count_select_when_a_point_fires(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv(faults.ENV, "enospc_at=rank0@save:begin,rank1@save:after_rank_file#2")
    faults.point("save:begin")  # rank 0 only
    faults.point("save:after_rank_file")  # the first time: not yet
    with pytest.raises(OSError):
        faults.point("save:after_rank_file")
    faults.point("save:after_rank_file")  # the third: done
    monkeypatch.setenv(faults.ENV, "enospc_at=save:after_rank_file")  # a new value counts afresh
    with pytest.raises(OSError):
        faults.point("save:after_rank_file")


def test_kill_at_sends_sigkill(monkeypatch):
    monkeypatch.setenv(faults.ENV, "kill_at=save:begin")
    pid = os.fork()
    if pid == 0:  # the child dies at the point, or says it did not
        try:
            faults.point("save:begin")
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_other_kinds_are_read_where_they_act(monkeypatch):
    monkeypatch.setenv(faults.ENV, "kill_at=save:begin")
    assert faults.targets("kill_at") == ["save:begin"] and faults.targets("enospc_at") == []
    with pytest.raises(KeyError):
        faults.targets("no_such_kind")
