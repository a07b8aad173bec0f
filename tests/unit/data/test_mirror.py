"""PositionMirror, the loader of a rank that reads nothing: it holds exactly the position the ShardLoader of the same
shards, dp rank/size, workers and seed holds (given, resumed or re-split), and never yields a batch."""

import json
import os
from types import SimpleNamespace

import pytest

from megacoca.config.recipes import build_config
from megacoca.data.loaders import build_train_loader
from megacoca.data.mirror import PositionMirror
from megacoca.data.shards import ShardLoader
from megacoca.data.transforms import ImageTransform

from .conftest import StubTokenizer, write_shards

SIZES = [3, 7, 2, 5, 9, 4, 6, 1, 8, 5]


@pytest.fixture
def paths(tmp_path):
    return write_shards(tmp_path / "d", len(SIZES), SIZES)[0]


def reader(paths, dp_rank=0, dp_size=1, num_workers=0, batch_size=3):
    return ShardLoader(paths, batch_size, StubTokenizer(), ImageTransform(8, train=True), dp_rank, dp_size,
                       num_workers, seed=7, shuffle_buffer=4, multiprocessing_context="fork" if num_workers else None)


def mirror_of(paths, dp_rank=0, dp_size=1, num_workers=0, batch_size=3):
    return PositionMirror(paths, batch_size, dp_rank, dp_size, num_workers, seed=7)


def consume(loader, batches):
    for taken, _ in enumerate(loader, 1):
        if taken == batches:
            break
    return loader.state_dict()


def plain(state):
    return json.loads(json.dumps(state))  # what a checkpoint gives back


def test_starts_where_a_fresh_reader_starts(paths):
    assert mirror_of(paths, 1, 2, 2).state_dict() == reader(paths, 1, 2, 2).state_dict()


def test_mirrored_state_round_trips(paths):
    source = reader(paths, 1, 2)
    mirror = mirror_of(paths, 1, 2)
    for batches in (2, 3):
        mirror.mirror(consume(source, batches))
        assert mirror.state_dict() == source.state_dict()
    resumed = mirror_of(paths, 1, 2)
    resumed.load_state_dict(plain(mirror.state_dict()))
    assert resumed.state_dict() == source.state_dict()
    # the reader resumed from the mirror's state continues exactly where the source is
    follower = reader(paths, 1, 2)
    follower.load_state_dict(plain(resumed.state_dict()))
    assert next(iter(follower))["keys"] == next(iter(source))["keys"]


def test_loads_what_the_reader_loads_and_lands_where_it_lands(paths):
    state = consume(reader(paths, 0, 2), 4)
    old = {key: value for key, value in state.items() if key != "plan"} | {"version": 1}  # a version 1 state
    for given in (state, old):
        mirror, twin = mirror_of(paths, 0, 2, batch_size=5), reader(paths, 0, 2, batch_size=5)
        mirror.load_state_dict(plain(given))
        twin.load_state_dict(plain(given))
        assert mirror.state_dict() == twin.state_dict()


def test_rejects_what_the_reader_rejects(paths):
    other_rank = consume(reader(paths, 1, 2), 1)
    with pytest.raises(ValueError) as from_reader:
        reader(paths, 0, 2).load_state_dict(other_rank)
    for take in (PositionMirror.mirror, PositionMirror.load_state_dict):
        with pytest.raises(ValueError) as from_mirror:
            take(mirror_of(paths, 0, 2), other_rank)
        assert str(from_mirror.value) == str(from_reader.value)
    with pytest.raises(ValueError, match="cannot feed dp_size=11"):
        mirror_of(paths, 0, 11)


@pytest.mark.parametrize("new_dp, new_workers", [(3, 1), (1, 0), (2, 2)])
def test_resplit_equals_the_readers(paths, new_dp, new_workers):
    old = [reader(paths, rank, 2, 2) for rank in range(2)]
    states = [plain(consume(loader, 3 + 2 * rank)) for rank, loader in enumerate(old)]
    for rank in range(new_dp):
        mirror, twin = mirror_of(paths, rank, new_dp, new_workers), reader(paths, rank, new_dp, new_workers)
        mirror.load_resplit_state(states)
        twin.load_resplit_state(states)
        assert mirror.state_dict() == twin.state_dict()
    # states saved by mirrors re-split as the readers' do
    mirrors = [mirror_of(paths, rank, 2, 2) for rank in range(2)]
    for mirror, state in zip(mirrors, states):
        mirror.mirror(state)
    again = mirror_of(paths, 0, new_dp, new_workers)
    again.load_resplit_state([plain(mirror.state_dict()) for mirror in mirrors])
    twin = reader(paths, 0, new_dp, new_workers)
    twin.load_resplit_state(states)
    assert again.state_dict() == twin.state_dict()


def test_reads_nothing_and_iterating_is_an_error(paths):
    mirror = mirror_of(paths, 0, 2)
    state = consume(reader(paths, 0, 2), 2)
    for path in paths:
        os.remove(path)  # nothing below opens a shard
    mirror.mirror(state)
    assert mirror.state_dict() == state and mirror.skipped == {}
    with pytest.raises(TypeError, match="reads no data and yields no batch"):
        iter(mirror)
    with pytest.raises(TypeError, match="mirror\\(state\\)"):
        for _ in mirror:
            pass


def test_build_train_loader_reads_on_the_first_pipeline_stage_only(paths, tmp_path):
    job = build_config(overrides=[f"data.train_shards={tmp_path / 'd'}", "schedule.micro_batch_size=2",
                                  "data.num_workers=1"])
    model_cfg = SimpleNamespace(image_size=8)
    loaders = {pp_rank: build_train_loader(job, model_cfg, SimpleNamespace(pp_rank=pp_rank, pp_size=2, dp_rank=1,
                                                                           dp_size=2), StubTokenizer())
               for pp_rank in range(2)}
    assert isinstance(loaders[0], ShardLoader) and isinstance(loaders[1], PositionMirror)
    assert loaders[1].state_dict() == loaders[0].state_dict()
    loaders[1].mirror(consume(loaders[0], 2))
    assert loaders[1].state_dict() == loaders[0].state_dict()
