"""The data position of one data-parallel rank's loader: what it holds, its saved state, and its re-split.

Position: per stream (megacoca.data.streams), the position after its last consumed batch: (epoch, shard index in
the stream's list, samples of that shard already emitted, counted from the shard's first sample) plus the stream's
cumulative skip counts; and whose turn is next, the batches consumed, and the re-split plan. `LoaderPosition`
holds it and owns the state format: `state_dict()` returns it as plain data, `load_state_dict()` checks a saved
state against the loader (same shards, seed, dp rank/size, num_workers) and takes it. The state is per rank: save
every rank's. The reading loader (megacoca.data.shards.ShardLoader) advances it batch by batch and continues from a
loaded one exactly (re-reading, without decoding, at most one shard per stream to fast-forward); the loader of a
rank that reads nothing (megacoca.data.mirror.PositionMirror) only holds it.

Re-split for another dp size or worker count (`reshard_states(all old ranks' states, dp_size, num_workers)`,
the batch size may change too): the leftover epochs are those from the slowest old stream's epoch to the
fastest's (and any epoch a previous re-split planned). For each, the new state carries a plan: the pieces in
the epoch's shard order that no old stream consumed, each shard not read to the end by its old reader from
the sample that reader stopped at (0 if it had not started it; shards it had passed are gone), dealt like
shards (new rank `i` takes pieces `i::dp_size`, its stream `w` takes `w::W`; a reader with none moves on).
Every new stream starts at the slowest epoch; the epochs after the leftover ones follow the normal order at
the new size. A piece started at sample k continues the shard's shuffled order, and crops stay seeded by the
sample's index in it. Guaranteed, within each leftover epoch: the new ranks together read exactly the samples
no old rank consumed, each once. "Consumed" is exact because positions are at batch boundaries: a sample is
either in a batch the old loader handed out before `state_dict()` or unread (there is no partial batch; a
batch prefetched but not handed out counts as unread). Earlier epochs were consumed whole by the old ranks.
Not guaranteed: the order of the samples, which rank reads which, and the batches' composition differ from a
run that kept its size (with finite `epochs`, each stream's last partial batch of the last epoch is dropped as
always). The same dp size and worker count gives back the states unchanged (an exact resume).
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections import Counter
from typing import Any, Sequence

SKIP_REASONS = ("corrupt_image", "empty_caption", "non_utf8_text", "missing_image", "missing_caption", "corrupt_shard",
                "failed_shard", "missing_label", "bad_label")  # the last two: label sources (megacoca.data.source_text)
RETRY_COUNT = "shard_retry"  # failed attempts at remote shards, kept with the skip counts (not a skip reason)
STATE_VERSION = 2  # 2: adds the re-split plan (version 1 states load as having none)


def check_loader_args(batch_size: int, dp_rank: int, dp_size: int, num_workers: int, seed: int) -> None:
    """ValueError for a batch size, dp rank/size, worker count or seed no loader can have."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, dp_size): got dp_rank={dp_rank}, dp_size={dp_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def _refuse_mixture_state(state: Any) -> None:
    if isinstance(state, dict) and state.get("kind") == "mixture":
        raise ValueError("the checkpoint's data-loader state is a mixture's (data.sources), this run reads one source "
                         "(data.train_shards): resume it with the same data.sources, or start fresh")


def shards_fingerprint(urls: Sequence[str]) -> str:
    """What a state records of its shard list: a hash of the shards' file names, in order."""
    names = "\n".join(os.path.basename(url.rstrip("/")) for url in urls)
    return hashlib.sha1(names.encode()).hexdigest()[:16]


def _parse_plan(plan: dict, num_shards: int) -> dict[int, list[tuple[int, int]]]:
    """A state's plan (str or int epoch keys, [k, first sample] pieces) -> {epoch: [(k, first), ...]}."""
    try:
        parsed = {int(epoch): [(int(k), int(first)) for k, first in pieces] for epoch, pieces in plan.items()}
    except (AttributeError, TypeError, ValueError):
        raise ValueError("data-loader state has a malformed re-split plan (want {epoch: [[k, sample], ...]})") from None
    for epoch, pieces in parsed.items():
        bad = [piece for piece in pieces if not (0 <= piece[0] < num_shards and piece[1] >= 0)]
        if epoch < 0 or bad or len({k for k, _ in pieces}) != len(pieces):
            raise ValueError(f"data-loader state's re-split plan for epoch {epoch} does not fit {num_shards} "
                             "shards (or repeats one)")
    return parsed


def _plan_to_state(plan: dict[int, list[tuple[int, int]]]) -> dict[str, list[list[int]]]:
    return {str(epoch): [[k, first] for k, first in plan[epoch]] for epoch in sorted(plan)}


class LoaderPosition:
    """The position of one data-parallel rank's loader over `urls` (see the module doc), and its state.

    `streams[w]`: stream w's `{"epoch", "shard", "sample", "skipped"}` after its last consumed batch; `turn`: the
    stream whose batch comes next; `batches`: batches consumed; `plan`: the re-split plan, `{epoch: [(k, first
    sample), ...]}` (`{}` if none). Raises ValueError when the shards cannot give every reader one (dp_size x
    max(num_workers, 1) readers)."""

    def __init__(self, urls: list[str], batch_size: int, dp_rank: int, dp_size: int, num_workers: int, seed: int):
        self.urls = urls
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.num_workers = int(num_workers)
        self.num_streams = max(self.num_workers, 1)
        if len(urls) < self.dp_size * self.num_streams:
            raise ValueError(
                f"{len(urls)} shards cannot feed dp_size={dp_size} x num_workers={self.num_streams} "
                f"(= {self.dp_size * self.num_streams} readers, each needs >= 1 shard): write more, smaller shards "
                "or use fewer workers"
            )
        self.fingerprint = shards_fingerprint(urls)
        self.reset()

    def reset(self) -> None:
        """Back to the start: every stream at epoch 0, no skips, no plan."""
        self.streams = [{"epoch": 0, "shard": 0, "sample": 0, "skipped": {}} for _ in range(self.num_streams)]
        self.turn = 0
        self.batches = 0
        self.plan: dict[int, list[tuple[int, int]]] = {}

    def record(self, stream: int, position: dict[str, Any], *, batch: bool) -> None:
        """`stream` is at `position` (epoch, shard, sample, skipped); `batch`: it got there by a consumed batch
        (the next turn is the following stream's), not by a position-only end-of-stream marker."""
        self.streams[stream] = position
        if batch:
            self.turn = (stream + 1) % self.num_streams
            self.batches += 1

    @property
    def skipped(self) -> dict[str, int]:
        """Skip counts by reason (every one of SKIP_REASONS), summed over the streams."""
        total = Counter({reason: 0 for reason in SKIP_REASONS})
        for position in self.streams:
            total.update(position["skipped"])
        return {reason: total[reason] for reason in SKIP_REASONS}

    @property
    def shard_retries(self) -> int:
        return sum(position["skipped"].get(RETRY_COUNT, 0) for position in self.streams)

    @property
    def epoch(self) -> int:
        """The epoch the slowest stream is in."""
        return min(position["epoch"] for position in self.streams)

    def state_dict(self) -> dict[str, Any]:
        """The position as plain ints/strs/dicts (torch.save or json). `plan` is `{str(epoch): [[k, first
        sample], ...]}`, `k` indexing the epoch's shard order, the same on every rank."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "num_workers": self.num_workers,
            "num_shards": len(self.urls),
            "shards_fingerprint": self.fingerprint,
            "batch_size": self.batch_size,
            "batches": self.batches,
            "turn": self.turn,
            "streams": [
                {"epoch": p["epoch"], "shard": p["shard"], "sample": p["sample"], "skipped": dict(p["skipped"])}
                for p in self.streams
            ],
            "plan": _plan_to_state(self.plan),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take `state` (from `state_dict()` of a loader with the same shards, seed, dp_rank, dp_size and
        num_workers, or from `reshard_states` for this dp size and num_workers; the batch size may differ:
        positions count samples). Version 1 states (no plan) are accepted."""
        _refuse_mixture_state(state)
        if state.get("version") not in (1, STATE_VERSION):
            raise ValueError(f"unsupported data-loader state version {state.get('version')!r} "
                             f"(expected 1 or {STATE_VERSION})")
        expected = {
            "seed": self.seed,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "num_workers": self.num_workers,
            "num_shards": len(self.urls),
            "shards_fingerprint": self.fingerprint,
        }
        wrong = [f"{name}: saved {state.get(name)!r}, now {value!r}" for name, value in expected.items()
                 if state.get(name) != value]
        if wrong:
            raise ValueError("data-loader state does not match this loader (exact resume needs the same "
                             "shards, seed, dp rank/size and num_workers): " + "; ".join(wrong))
        streams = state["streams"]
        if len(streams) != self.num_streams:
            raise ValueError(f"data-loader state has {len(streams)} streams, this loader {self.num_streams}")
        self.streams = [
            {"epoch": int(s["epoch"]), "shard": int(s["shard"]), "sample": int(s["sample"]),
             "skipped": {k: int(v) for k, v in s.get("skipped", {}).items()}}
            for s in streams
        ]
        self.turn = int(state["turn"]) % self.num_streams
        self.batches = int(state.get("batches", 0))
        self.plan = _parse_plan(state.get("plan", {}), len(self.urls))

    def load_resplit_state(self, states: Sequence[dict[str, Any]]) -> None:
        """Take the states of every data-parallel rank of a run with another dp size or num_workers (`states[r]`:
        old dp rank r's `state_dict()`), re-split for this position's dp rank by `reshard_states`."""
        self.load_state_dict(reshard_states(states, self.dp_size, self.num_workers)[self.dp_rank])


def reshard_states(states: Sequence[dict[str, Any]], dp_size: int, num_workers: int) -> list[dict[str, Any]]:
    """Each new dp rank's loader state for a run resumed with `dp_size` ranks of `num_workers` workers, from
    `states[r]` = `ShardLoader.state_dict()` of old dp rank r (every old rank, in rank order).

    The result's element i loads into `ShardLoader(same shards and seed, dp_rank=i, dp_size=dp_size,
    num_workers=num_workers)`; within the leftover epochs the new ranks read every sample the old ones had
    not consumed exactly once (the module doc's "Re-split" says what is and is not guaranteed). States that
    carry a plan (re-split before) are re-split with it honoured. Skip counts are summed onto new rank 0's
    first stream, so totals over the ranks are kept; `batches` of every new rank starts at the largest old
    rank's count and counts on. The same dp size and num_workers gives back copies of the states (version 2).
    A bad input (no states, a state of an unknown version, states of different runs, a missing or misplaced
    rank) raises ValueError with a line naming the problem.
    """
    old_plan = _checked_plan(states, dp_size, num_workers)
    first = states[0]
    if dp_size == int(first["dp_size"]) and num_workers == int(first["num_workers"]):
        return [dict(copy.deepcopy(state), version=STATE_VERSION, plan=_plan_to_state(old_plan))
                for state in states]
    slowest, plan = _leftover_plan(states, old_plan)
    skipped = _summed_skips(states)
    new_streams = max(num_workers, 1)
    return [
        {
            "version": STATE_VERSION,
            "seed": first["seed"],
            "dp_rank": rank,
            "dp_size": dp_size,
            "num_workers": num_workers,
            "num_shards": int(first["num_shards"]),
            "shards_fingerprint": first["shards_fingerprint"],
            "batch_size": first.get("batch_size"),
            "batches": max(int(state.get("batches", 0)) for state in states),
            "turn": 0,
            "streams": [{"epoch": slowest, "shard": 0, "sample": 0,
                         "skipped": dict(skipped) if rank == stream == 0 else {}} for stream in range(new_streams)],
            "plan": _plan_to_state(plan),
        }
        for rank in range(dp_size)
    ]


def _checked_plan(states: Sequence[dict[str, Any]], dp_size: int, num_workers: int) -> dict:
    """The old run's re-split plan, once `states` are checked to be every old rank's of one run (in rank order)
    and the shards can feed `dp_size` x `num_workers` new readers; ValueError naming the first problem."""
    if not states:
        raise ValueError("reshard_states needs the data-loader state of every old dp rank, got none")
    if dp_size < 1 or num_workers < 0:
        raise ValueError(f"reshard_states needs dp_size >= 1 and num_workers >= 0, got {dp_size} and {num_workers}")
    for rank, state in enumerate(states):
        _refuse_mixture_state(state)
        version = state.get("version") if isinstance(state, dict) else None
        if version not in (1, STATE_VERSION):
            raise ValueError(f"states[{rank}]: unsupported data-loader state version {version!r} "
                             f"(expected 1 or {STATE_VERSION})")
    first = states[0]
    num_shards = int(first["num_shards"])
    plans = [_parse_plan(state.get("plan", {}), num_shards) for state in states]
    for rank, state in enumerate(states):
        for name in ("seed", "shards_fingerprint", "num_shards", "dp_size", "num_workers"):
            if state.get(name) != first.get(name):
                raise ValueError(f"data-loader states of different runs: {name} is {first.get(name)!r} in "
                                 f"states[0], {state.get(name)!r} in states[{rank}]")
        if plans[rank] != plans[0]:
            raise ValueError(f"data-loader states of different runs: states[0] and states[{rank}] have "
                             "different re-split plans")
    _check_ranks(states)
    new_streams = max(num_workers, 1)
    if num_shards < dp_size * new_streams:
        raise ValueError(f"{num_shards} shards cannot feed dp_size={dp_size} x num_workers={new_streams} "
                         f"(= {dp_size * new_streams} readers, each needs >= 1 shard)")
    return plans[0]


def _check_ranks(states: Sequence[dict[str, Any]]) -> None:
    """ValueError unless `states` are one per old dp rank, in rank order, each with the old run's stream count."""
    old_dp, old_workers = int(states[0]["dp_size"]), int(states[0]["num_workers"])
    old_streams = max(old_workers, 1)
    if len(states) != old_dp:
        raise ValueError(f"got {len(states)} data-loader states for dp_size={old_dp}: pass every old dp rank's, "
                         "in rank order")
    for rank, state in enumerate(states):
        if state.get("dp_rank") != rank:
            raise ValueError(f"states[{rank}] is dp rank {state.get('dp_rank')!r}'s: pass every old dp rank's "
                             "state once, in rank order")
        if len(state["streams"]) != old_streams:
            raise ValueError(f"states[{rank}] has {len(state['streams'])} streams, num_workers={old_workers} "
                             f"makes {old_streams}")


def _leftover_plan(states: Sequence[dict[str, Any]], old_plan: dict) -> tuple[int, dict]:
    """(the slowest old stream's epoch, {epoch: the pieces no old stream consumed}) for every leftover epoch
    whose leftovers are not the whole epoch (an untouched epoch is just the normal order at the new size)."""
    old_dp, old_streams = int(states[0]["dp_size"]), max(int(states[0]["num_workers"]), 1)
    whole = [(k, 0) for k in range(int(states[0]["num_shards"]))]
    # item j of an epoch's pieces belongs to old rank j % D, its stream (j // D) % W, at index j // (D W)
    positions = [[(int(p["epoch"]), int(p["shard"]), int(p["sample"])) for p in state["streams"]]
                 for state in states]
    epochs = [position[0] for rank in positions for position in rank]
    slowest = min(epochs)
    plan = {}
    for epoch in range(slowest, max(epochs + list(old_plan)) + 1):
        leftover = []
        for j, (k, start) in enumerate(old_plan.get(epoch, whole)):
            reached, index, sample = positions[j % old_dp][j // old_dp % old_streams]
            at = j // (old_dp * old_streams)
            if reached > epoch or (reached == epoch and at < index):
                continue  # its old reader passed it
            if reached == epoch and at == index:
                start = max(start, sample)  # its old reader stopped inside it
            leftover.append((k, start))
        if leftover != whole:
            plan[epoch] = leftover
    return slowest, plan


def _summed_skips(states: Sequence[dict[str, Any]]) -> Counter:
    """Skip counts by reason, summed over every stream of every old rank."""
    skipped: Counter = Counter()
    for state in states:
        for stream in state["streams"]:
            skipped.update({reason: int(count) for reason, count in stream.get("skipped", {}).items()})
    return skipped
