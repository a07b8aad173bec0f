"""The loader of a rank that reads no data but must keep the data position exact: `PositionMirror`.

Under pipeline parallelism only stage 0 reads and decodes batches (it needs the images, and only it can tell
which samples are valid); the other stages' ranks hold a PositionMirror in its place (megacoca.data.loaders
chooses). It holds the position the ShardLoader of the same shards, dp rank, dp size, workers and seed holds
(megacoca.data.position.LoaderPosition, the same code): `mirror(state)` sets it from the reading rank's
`state_dict()`, so this rank's checkpoint file saves the reading rank's exact position, and a resume
(`load_state_dict`) or a resume at another data-parallel size (`load_resplit_state`) takes what ShardLoader
takes and lands where it lands. It never yields a batch: iterating it raises TypeError.
"""

from __future__ import annotations

from typing import Any, NoReturn, Sequence

from megacoca.data.position import LoaderPosition, check_loader_args
from megacoca.data.shard_urls import expand_shards


class PositionMirror:
    """The data position of a rank that reads nothing (see the module doc).

    Args: the position-defining arguments of the ShardLoader it mirrors (same meaning, same checks): `shards`
    (spec; local paths must exist, nothing is opened), `batch_size`, `dp_rank`, `dp_size`, `num_workers`, `seed`.
    """

    def __init__(self, shards, batch_size: int, dp_rank: int = 0, dp_size: int = 1, num_workers: int = 0,
                 seed: int = 0):
        check_loader_args(batch_size, dp_rank, dp_size, num_workers, seed)
        self.urls = expand_shards(shards)
        self._position = LoaderPosition(self.urls, batch_size, dp_rank, dp_size, num_workers, seed)

    batch_size = property(lambda self: self._position.batch_size)
    dp_rank = property(lambda self: self._position.dp_rank)
    dp_size = property(lambda self: self._position.dp_size)
    num_workers = property(lambda self: self._position.num_workers)
    seed = property(lambda self: self._position.seed)

    @property
    def skipped(self) -> dict[str, int]:
        """Always empty: the reading rank counts the skips (they are in the mirrored state's streams)."""
        return {}

    def __iter__(self) -> NoReturn:
        raise TypeError(f"PositionMirror (dp rank {self.dp_rank}) reads no data and yields no batch: only the rank "
                        "that reads (pipeline stage 0's ShardLoader) is iterated; this one takes its position with "
                        "mirror(state)")

    def mirror(self, state: dict[str, Any]) -> None:
        """Take the reading rank's position: `state` is `state_dict()` of the ShardLoader of the same shards, dp
        rank, dp size, workers and seed (checked as `load_state_dict` checks it; ValueError if it does not fit)."""
        self._position.load_state_dict(state)

    def state_dict(self) -> dict[str, Any]:
        """The position last given (by `mirror`, `load_state_dict` or `load_resplit_state`; the start before any),
        in ShardLoader's state format."""
        return self._position.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: take `state` exactly as `ShardLoader.load_state_dict` takes it."""
        self._position.load_state_dict(state)

    def load_resplit_state(self, states: Sequence[dict[str, Any]]) -> None:
        """Resume at another dp size or worker count: from every old dp rank's state, the position the ShardLoader
        of this rank would hold after the same call (`reshard_states`)."""
        self._position.load_resplit_state(states)
