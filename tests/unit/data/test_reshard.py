"""Re-splitting loader states for another dp size / worker count: within the leftover epochs every sample no
old rank consumed is read exactly once by the new ranks; after them, the normal order at the new size."""

import json
from collections import Counter

import pytest
import torch

from megacoca.data import streams as streams_module
from megacoca.data.shards import ShardLoader, reshard_states
from megacoca.data.transforms import ImageTransform

from .conftest import StubTokenizer, write_shards

SIZES = [3, 7, 2, 5, 9, 4, 6, 1, 8, 5]  # 10 uneven shards, 50 samples


@pytest.fixture
def epoch_tagged(monkeypatch):
    """Keys come out as `epoch/key`, so a test sees which epoch each consumed sample belonged to (batches span
    epochs). Patched on the class: forked DataLoader workers inherit it."""
    decode = streams_module.RankStreams.decode

    def tagged(self, raw, epoch, shard, index, skipped):
        item = decode(self, raw, epoch, shard, index, skipped)
        return None if item is None else (item[0], item[1], f"{epoch}/{item[2]}", item[3])

    monkeypatch.setattr(streams_module.RankStreams, "decode", tagged)


def make_loader(paths, dp_rank, dp_size, num_workers, batch_size, shuffle=True, state=None):
    loader = ShardLoader(paths, batch_size, StubTokenizer(), ImageTransform(8, train=True), dp_rank, dp_size,
                         num_workers, seed=11, shuffle=shuffle, shuffle_buffer=4,
                         multiprocessing_context="fork" if num_workers else None)
    if state is not None:
        loader.load_state_dict(json.loads(json.dumps(state)))  # plain data: survives a checkpoint
    return loader


def consume(loader, until):
    """[(stream, epoch, key)] of the batches taken: `until` batches (int), or until every stream of the loader
    is in epoch `until[0]` or later (a 1-tuple)."""
    out, taken = [], 0
    if isinstance(until, int) and until == 0:
        return out
    for batch in loader:
        stream = (loader._position.turn - 1) % loader.num_streams  # the stream whose batch this was
        out += [(stream, int(tag.split("/")[0]), tag.split("/")[1]) for tag in batch["keys"]]
        taken += 1
        if (until == taken) if isinstance(until, int) else loader.epoch >= until[0]:
            break
    return out


def run_chain(paths, chain, shuffle=True):
    """chain: [(dp_size, num_workers, batch_size, batches per rank)]; each phase after the first resumes from
    the previous one's states re-split with reshard_states. The last phase runs until every stream has passed
    the leftover epochs and the one after. Returns per phase {rank: [(stream, epoch, key)]} and the last epoch
    any earlier phase reached."""
    phases, states, reached = [], None, -1
    for i, (dp_size, num_workers, batch_size, takes) in enumerate(chain):
        if states is not None:
            states = reshard_states(states, dp_size, num_workers)
            assert len(states) == dp_size
        loaders = [make_loader(paths, rank, dp_size, num_workers, batch_size, shuffle,
                               None if states is None else states[rank]) for rank in range(dp_size)]
        last = i == len(chain) - 1
        phases.append({rank: consume(loader, (reached + 2,) if last else takes[rank])
                       for rank, loader in enumerate(loaders)})
        states = [loader.state_dict() for loader in loaders]
        if not last:
            reached = max(reached, max(s["epoch"] for state in states for s in state["streams"]))
    return phases, reached


def epoch_keys(loader, epoch, stream):
    """The keys `stream` of `loader` reads in a normal `epoch`, in order (shard order, then shuffle buffer)."""
    streams = loader._streams
    return [raw["__key__"] for shard in streams.stream_shards(epoch, stream)
            for raw in streams.shard_samples(epoch, shard, on_error=None)]


def check_exactly_once(paths, keys, chain, shuffle=True):
    phases, reached = run_chain(paths, chain, shuffle)
    by_epoch = Counter((epoch, key) for phase in phases for rank in phase.values() for _, epoch, key in rank)
    for epoch in range(reached + 1):  # up to the last leftover epoch: every sample once over all phases
        got = Counter({key: n for (e, key), n in by_epoch.items() if e == epoch})
        assert got == Counter(keys), f"epoch {epoch}: repeated {sorted(k for k, n in got.items() if n > 1)}, " \
                                     f"missing {sorted(set(keys) - set(got))}"
    assert any(e <= reached for rank in phases[-1].values() for _, e, _ in rank), "nothing left to re-split"
    # the epoch after the leftovers: each new stream reads exactly what a fresh loader of the new size would
    dp_size, num_workers, batch_size, _ = chain[-1]
    for rank, got in phases[-1].items():
        fresh = make_loader(paths, rank, dp_size, num_workers, batch_size, shuffle)
        for stream in range(max(num_workers, 1)):
            mine = [key for s, e, key in got if s == stream and e == reached + 1]
            assert mine == epoch_keys(fresh, reached + 1, stream), f"rank {rank} stream {stream}"
    return phases, reached


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("old, new", [
    ((2, 0, 3, [7, 11]), (3, 0, 2)),
    ((2, 0, 3, [7, 11]), (1, 0, 5)),
    ((3, 0, 2, [5, 9, 13]), (2, 0, 4)),
    ((3, 0, 2, [5, 9, 13]), (4, 0, 3)),
])
def test_leftover_epochs_are_read_exactly_once(tmp_path, epoch_tagged, shuffle, old, new):
    paths, keys = write_shards(tmp_path / "d", len(SIZES), SIZES)
    phases, reached = check_exactly_once(paths, keys, [old, (*new, None)], shuffle)
    assert reached >= 1  # the old streams were spread over epochs


@pytest.mark.parametrize("old, new", [
    ((2, 2, 3, [6, 9]), (3, 0, 2)),
    ((2, 0, 2, [9, 4]), (2, 2, 3)),
    ((3, 2, 2, [7, 5, 10]), (4, 2, 5)),
])
def test_leftover_epochs_with_workers(tmp_path, epoch_tagged, old, new):
    paths, keys = write_shards(tmp_path / "d", len(SIZES), SIZES)
    check_exactly_once(paths, keys, [old, (*new, None)])


def test_fewer_leftover_pieces_than_readers(tmp_path, epoch_tagged):
    """One reader stopped inside the last shard of its epoch: one piece left for 8 new readers; the 7 with none
    move on to the next epoch (no 'no valid sample' error for their empty planned epoch)."""
    paths, keys = write_shards(tmp_path / "d", len(SIZES), SIZES)
    old = make_loader(paths, 0, 1, 0, 1, shuffle=False)
    consume(old, sum(SIZES) - 2)
    states = reshard_states([old.state_dict()], 4, 2)
    assert states[0]["plan"] == {"0": [[len(SIZES) - 1, SIZES[-1] - 2]]}
    check_exactly_once(paths, keys, [(1, 0, 1, [sum(SIZES) - 2]), (4, 2, 3, None)], shuffle=False)


@pytest.mark.parametrize("chain", [
    [(2, 0, 3, [7, 11]), (3, 0, 2, [2, 1, 3]), (2, 2, 4, [2, 1]), (1, 0, 3, None)],
    [(2, 0, 3, [7, 11]), (3, 0, 2, [0, 0, 0]), (2, 0, 2, None)],  # planned epochs no stream has reached yet
])
def test_reshard_of_a_reshard_keeps_the_guarantee(tmp_path, epoch_tagged, chain):
    """Re-split, read a little or nothing (streams still inside the planned epochs), re-split again."""
    paths, keys = write_shards(tmp_path / "d", len(SIZES), SIZES)
    phases, reached = check_exactly_once(paths, keys, chain)
    assert reached >= 1


@pytest.mark.parametrize("num_workers, plan", [(0, False), (2, False), (0, True)])
def test_same_size_gives_the_same_next_batches(tmp_path, epoch_tagged, num_workers, plan):
    paths, _ = write_shards(tmp_path / "d", len(SIZES), SIZES)
    if plan:  # states that already carry a plan
        old = make_loader(paths, 0, 1, 0, 3)
        consume(old, 7)
        states = reshard_states([old.state_dict()], 2, num_workers)
        assert states[0]["plan"]
        loaders = [make_loader(paths, rank, 2, num_workers, 3, state=states[rank]) for rank in range(2)]
    else:
        loaders = [make_loader(paths, rank, 2, num_workers, 3) for rank in range(2)]
    for loader, n in zip(loaders, (5, 8)):
        consume(loader, n)
    states = [loader.state_dict() for loader in loaders]
    assert reshard_states(states, 2, num_workers) == states
    for rank in range(2):
        plain = make_loader(paths, rank, 2, num_workers, 3, state=states[rank])
        resharded = make_loader(paths, rank, 2, num_workers, 3, state=reshard_states(states, 2, num_workers)[rank])
        a, b = [[batch for _, batch in zip(range(6), loader)] for loader in (plain, resharded)]
        assert [x["keys"] for x in a] == [x["keys"] for x in b]
        assert all(torch.equal(x["images"], y["images"]) for x, y in zip(a, b))


def test_skip_counts_and_batches_after_a_reshard(tmp_path, epoch_tagged):
    paths, _ = write_shards(tmp_path / "d", len(SIZES), SIZES)
    loaders = [make_loader(paths, rank, 2, 0, 3) for rank in range(2)]
    for loader in loaders:
        consume(loader, 4)
    states = [loader.state_dict() for loader in loaders]
    states[0]["streams"][0]["skipped"] = {"corrupt_image": 2, "shard_retry": 1}
    states[1]["streams"][0]["skipped"] = {"corrupt_image": 1, "empty_caption": 4}
    new = [make_loader(paths, rank, 3, 0, 2, state=state) for rank, state in enumerate(reshard_states(states, 3, 0))]
    assert new[0].skipped["corrupt_image"] == 3 and new[0].skipped["empty_caption"] == 4
    assert new[0].shard_retries == 1 and not any(new[1].skipped.values()) and new[2].shard_retries == 0
    assert all(loader.batches_consumed == 4 for loader in new)


def test_version_1_states_load_and_reshard(tmp_path, epoch_tagged):
    paths, keys = write_shards(tmp_path / "d", len(SIZES), SIZES)
    loaders = [make_loader(paths, rank, 2, 0, 3) for rank in range(2)]
    before = [consume(loader, n) for loader, n in zip(loaders, (6, 10))]
    states = [loader.state_dict() for loader in loaders]
    for state in states:
        del state["plan"]
        state["version"] = 1
    again = make_loader(paths, 1, 2, 0, 3, state=states[1])
    assert again.state_dict()["plan"] == {} and again.state_dict()["version"] == 2
    reached = max(s["epoch"] for state in states for s in state["streams"])
    new = [make_loader(paths, rank, 1, 0, 4, state=state) for rank, state in enumerate(reshard_states(states, 1, 0))]
    after = consume(new[0], (reached + 1,))
    for epoch in range(reached + 1):
        assert Counter(key for part in before + [after] for _, e, key in part if e == epoch) == Counter(keys)


def test_bad_inputs_are_one_line_value_errors(tmp_path):
    paths, _ = write_shards(tmp_path / "d", len(SIZES), SIZES)
    states = [make_loader(paths, rank, 2, 0, 3).state_dict() for rank in range(2)]
    other_seed = dict(states[1], seed=12)
    other_shards = make_loader(paths[:9], 1, 2, 0, 3).state_dict()
    cases = [
        ([], 2, 0, "got none"),
        (states[:1], 2, 0, r"got 1 data-loader states for dp_size=2"),
        (states[::-1], 2, 0, r"states\[0\] is dp rank 1's"),
        ([states[0], other_seed], 2, 0, r"different runs: seed is 11 in states\[0\], 12 in states\[1\]"),
        ([states[0], other_shards], 2, 0, "different runs: shards_fingerprint"),
        ([states[0], dict(states[1], version=3)], 2, 0, r"states\[1\]: unsupported data-loader state version 3"),
        ([states[0], dict(states[1], plan={"0": [[1, 0]]})], 2, 0, "different re-split plans"),
        ([dict(s, plan={"0": [[99, 0]]}) for s in states], 1, 0, "plan for epoch 0 does not fit 10 shards"),
        (states, 0, 0, "dp_size >= 1"),
        (states, 6, 2, "10 shards cannot feed dp_size=6"),
    ]
    for given, dp_size, num_workers, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            reshard_states(given, dp_size, num_workers)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="expected 1 or 2"):
        make_loader(paths, 0, 2, 0, 3).load_state_dict(dict(states[0], version=3))
