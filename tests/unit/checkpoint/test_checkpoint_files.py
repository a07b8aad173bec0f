"""Checkpoint bookkeeping without an engine: COMPLETE markers, resume selection, pruning, RNG round trip."""

import random

import numpy as np
import pytest
import torch

from megacoca.checkpoint.state import find_resume_checkpoint, prune
from megacoca.checkpoint.tags import COMPLETE, complete_checkpoints, rng_state, set_rng_state, tag_for
from megacoca.config.recipes import build_config


def _fake(checkpoint_dir, step, complete=True):
    path = checkpoint_dir / tag_for(step)
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"")
    if complete:
        (path / COMPLETE).write_text(f"{step}\n")
    return path


def _job(checkpoint_dir, resume):
    return build_config(overrides=[f"checkpoint.dir={checkpoint_dir}", f"checkpoint.resume={resume}"])


def test_auto_picks_newest_complete(tmp_path):
    _fake(tmp_path, 10)
    newest = _fake(tmp_path, 200)
    _fake(tmp_path, 300, complete=False)  # a save that crashed
    (tmp_path / "not_a_checkpoint").mkdir()
    assert [s for s, _ in complete_checkpoints(str(tmp_path))] == [10, 200]
    assert find_resume_checkpoint(_job(tmp_path, "auto")) == str(newest)


def test_auto_with_nothing_and_none(tmp_path):
    assert find_resume_checkpoint(_job(tmp_path / "missing", "auto")) is None
    _fake(tmp_path, 5)
    assert find_resume_checkpoint(_job(tmp_path, "none")) is None


def test_explicit_paths(tmp_path):
    good, bad = _fake(tmp_path, 1), _fake(tmp_path, 2, complete=False)
    assert find_resume_checkpoint(_job(tmp_path, str(good))) == str(good)
    with pytest.raises(FileNotFoundError, match="is incomplete"):
        find_resume_checkpoint(_job(tmp_path, str(bad)))
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        find_resume_checkpoint(_job(tmp_path, str(tmp_path / "nope")))
    (tmp_path / "latest").write_text(tag_for(1))
    assert find_resume_checkpoint(_job(tmp_path, str(tmp_path))) == str(good)


def test_prune_keeps_newest_and_drops_stale_partials(tmp_path):
    for step in (1, 2, 3):
        _fake(tmp_path, step)
    _fake(tmp_path, 4, complete=False)
    _fake(tmp_path, 9, complete=False)  # newer than the newest complete: maybe being written, keep
    _fake(tmp_path, 5)
    prune(str(tmp_path), keep=2, newest_step=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_for(3), tag_for(5), tag_for(9)]
    prune(str(tmp_path), keep=0, newest_step=5)
    assert len(list(tmp_path.iterdir())) == 3


def test_rng_round_trip():
    state = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_kill_while_pruning_leaves_the_old_checkpoint_incomplete_never_broken(tmp_path, monkeypatch):
    """Pruning takes COMPLETE away before the files: SIGKILLed in between (megacoca.launch.faults), the old tag
    is incomplete, never chosen by resume auto, and the next save's prune removes it."""
    import os
    import signal

    old, new = _fake(tmp_path, 1), _fake(tmp_path, 2)
    monkeypatch.setenv("MEGACOCA_FAULTS", "kill_at=remove:after_unmark")
    pid = os.fork()
    if pid == 0:
        try:
            prune(str(tmp_path), keep=1, newest_step=2)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    monkeypatch.delenv("MEGACOCA_FAULTS")
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert (old / "mp_rank_00_model_states.pt").exists() and not (old / COMPLETE).exists()
    assert complete_checkpoints(str(tmp_path)) == [(2, str(new))]
    assert find_resume_checkpoint(_job(tmp_path, "auto")) == str(new)
    prune(str(tmp_path), keep=1, newest_step=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_for(2)]
