"""The data position of one data-parallel rank's mixture loader (megacoca.data.mixture), its state and re-split.

What it holds: per source, that source's `LoaderPosition` (megacoca.data.position: every stream's epoch, shard,
sample and skip counts, and the re-split plan: the one-source position, unchanged); the global slot count (the
mixture's clock: megacoca.data.mixture_schedule); the samples each source gave this rank; the streams of a source
that were dropped (`data.on_source_failure: drop`); whose turn is next and the batches consumed.

Resume (`load_state_dict`): every source continues exactly where it stopped. The weights may change on resume (a
new mixture from that step on: the slots from there are assigned with the new weights); a source may be added (it
starts at its beginning) or removed (its position is kept in the state, so adding it back resumes it). Each of
these is returned as a line for the log. A source whose shards changed under the same name is an error naming it.

Re-split (`load_resplit_state`, another dp size or worker count): every source is re-split as the one-source
position is (`reshard_states`: each unread sample of every started epoch read once, none twice); the slot count
continues; the samples counted per source are summed onto the new rank 0, so totals over the ranks are kept.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

from megacoca.data.position import SKIP_REASONS, LoaderPosition, reshard_states

MIXTURE_STATE_VERSION = 1
MIXTURE_KIND = "mixture"


class MixturePosition:
    """The position of one dp rank's loader over the named sources `urls[name]` with `weights[name]` (module doc)."""

    def __init__(self, urls: dict[str, list[str]], weights: dict[str, float], batch_size: int, dp_rank: int,
                 dp_size: int, num_workers: int, seed: int):
        self.names = list(urls)
        self.weights = {name: float(weights[name]) for name in self.names}
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.dp_rank, self.dp_size, self.num_workers = int(dp_rank), int(dp_size), int(num_workers)
        self.num_streams = max(self.num_workers, 1)
        self.sources: dict[str, LoaderPosition] = {}
        for name in self.names:
            try:
                self.sources[name] = LoaderPosition(urls[name], batch_size, dp_rank, dp_size, num_workers, seed)
            except ValueError as error:
                raise ValueError(f"source {name!r}: {error}") from None
        self.retired: dict[str, dict] = {}
        self.reset()

    def reset(self) -> None:
        for position in self.sources.values():
            position.reset()
        self.slots = 0  # global slots consumed (over every dp rank) up to this rank's last batch
        self.batches = 0
        self.turn = 0
        self.consumed = {name: 0 for name in self.names}
        self.dead = {name: set() for name in self.names}

    @property
    def slots_per_batch(self) -> int:
        """Global slots one batch of every dp rank takes."""
        return self.batch_size * self.dp_size

    def record(self, stream: int, tag: dict[str, Any]) -> None:
        """The batch of `stream` tagged `tag` (its sources' stream positions, the samples it took from each, the
        sources that died in it) was consumed."""
        for name in self.names:
            self.sources[name].record(stream, tag["sources"][name], batch=True)
            self.consumed[name] += tag["counts"].get(name, 0)
            if name in tag["dead"]:
                self.dead[name].add(stream)
        self.slots += self.slots_per_batch
        self.batches += 1
        self.turn = (stream + 1) % self.num_streams

    # ---- accounting ---------------------------------------------------------------------------------
    def skipped(self) -> dict[str, int]:
        """Skip counts by reason, summed over the sources."""
        total = {reason: 0 for reason in SKIP_REASONS}
        for position in self.sources.values():
            for reason, count in position.skipped.items():
                total[reason] += count
        return total

    def accounting(self) -> dict[str, dict[str, int]]:
        """Per source: `samples` this rank took from it, `epochs` its slowest stream completed, `skipped` samples."""
        return {name: {"samples": self.consumed[name], "epochs": self.sources[name].epoch,
                       "skipped": sum(self.sources[name].skipped.values())} for name in self.names}

    # ---- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": MIXTURE_STATE_VERSION,
            "kind": MIXTURE_KIND,
            "seed": self.seed,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "batches": self.batches,
            "turn": self.turn,
            "slots": self.slots,
            "weights": dict(self.weights),
            "consumed": dict(self.consumed),
            "dead": {name: sorted(streams) for name, streams in self.dead.items() if streams},
            "sources": {name: position.state_dict() for name, position in self.sources.items()},
            "retired": copy.deepcopy(self.retired),
        }

    def load_state_dict(self, state: dict[str, Any]) -> list[str]:
        """Take a saved state of this dp rank (module doc); returns the lines to log (weights changed, sources
        added or removed). ValueError naming the problem when it is not a mixture state of this run."""
        self._check(state)
        expected = {"seed": self.seed, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                    "num_workers": self.num_workers}
        wrong = [f"{key}: saved {state.get(key)!r}, now {value!r}" for key, value in expected.items()
                 if state.get(key) != value]
        if wrong:
            raise ValueError("data mixture state does not match this loader (exact resume needs the same seed, dp "
                             "rank/size and num_workers): " + "; ".join(wrong))
        saved = {**state.get("retired", {}), **state["sources"]}
        for name in self.names:
            if name in saved:
                try:
                    self.sources[name].load_state_dict(saved[name])
                except ValueError as error:
                    raise ValueError(f"source {name!r}: {error}") from None
            else:
                self.sources[name].reset()
        self.slots, self.batches = int(state["slots"]), int(state["batches"])
        self.turn = int(state["turn"]) % self.num_streams
        self.consumed = {name: int(state["consumed"].get(name, 0)) for name in self.names}
        self.dead = {name: {int(s) for s in state.get("dead", {}).get(name, [])} for name in self.names}
        self.retired = {name: copy.deepcopy(saved[name]) for name in saved if name not in self.names}
        return self._changes(state)

    def load_resplit_state(self, states: Sequence[dict[str, Any]]) -> list[str]:
        """Take the states of every dp rank of a run with another dp size or worker count (`states[r]`: old dp
        rank r's), each source re-split by `reshard_states` (module doc); returns the lines to log."""
        if not states:
            raise ValueError("a data mixture re-split needs the state of every old dp rank, got none")
        for state in states:
            self._check(state)
        first = states[0]
        for name in self.names:
            if name in first["sources"] or name in first.get("retired", {}):
                old = [{**state.get("retired", {}), **state["sources"]}[name] for state in states]
                try:
                    new = reshard_states(old, self.dp_size, self.num_workers)[self.dp_rank]
                    self.sources[name].load_state_dict(new)
                except ValueError as error:
                    raise ValueError(f"source {name!r}: {error}") from None
            else:
                self.sources[name].reset()
        self.slots = max(int(state["slots"]) for state in states)
        self.batches = max(int(state["batches"]) for state in states)
        self.turn = 0
        totals = {name: sum(int(state["consumed"].get(name, 0)) for state in states) for name in self.names}
        self.consumed = {name: totals[name] if self.dp_rank == 0 else 0 for name in self.names}
        self.dead = {name: set() for name in self.names}  # streams are dealt anew: a dead source is found again
        old_names = {name for state in states for name in (*state["sources"], *state.get("retired", {}))}
        self.retired = {}
        for name in sorted(old_names - set(self.names)):  # kept, re-split, for a later run that adds it back
            old = [{**state.get("retired", {}), **state["sources"]}[name] for state in states]
            self.retired[name] = reshard_states(old, self.dp_size, self.num_workers)[self.dp_rank]
        return self._changes(first)

    def _check(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("kind") != MIXTURE_KIND:
            raise ValueError("the checkpoint's data-loader state is a single source's (data.train_shards), this run "
                             "reads a mixture (data.sources): resume it with the same data.train_shards, or start "
                             "the mixture from a fresh run (or --set checkpoint.resume=none)")
        if state.get("version") != MIXTURE_STATE_VERSION:
            raise ValueError(f"unsupported data mixture state version {state.get('version')!r} "
                             f"(expected {MIXTURE_STATE_VERSION})")

    def _changes(self, state: dict[str, Any]) -> list[str]:
        """Lines saying how the mixture differs from the saved one's."""
        old = {name: float(w) for name, w in state.get("weights", {}).items()}
        lines = []
        added = [name for name in self.names if name not in old]
        removed = [name for name in old if name not in self.weights]
        moved = [f"{name} {old[name]:g} -> {self.weights[name]:g}" for name in self.names
                 if name in old and old[name] != self.weights[name]]
        at = f"from global sample {self.slots}"
        if moved:
            lines.append(f"data mixture: weights changed {at}: " + ", ".join(moved))
        if added:
            lines.append(f"data mixture: sources added {at} (each starts at its first epoch): " + ", ".join(added))
        if removed:
            lines.append(f"data mixture: sources removed {at} (their positions are kept in the checkpoint): "
                         + ", ".join(removed))
        return lines
