"""ParallelDims: the data x pipeline x tensor degrees, their process groups, and DeepSpeed's `mpu` view of them.

Ranks are laid out on a grid `torch.arange(world).view(dp, pp, tp)` (tensor-parallel neighbours are adjacent
ranks, so they share a node first). A rank's data-parallel group is its column along dp, its tensor group
its row along tp, its pipeline group the line along pp; the model-parallel group is its (pp, tp) slab.
With tp > 1 each tensor group gets a second communicator over the same ranks, `text_tp_group`: the unimodal text
tower's collectives when it runs concurrently with the image tower (megacoca.parallel.overlap), so that the two
towers' collectives never share one communicator's order. (NCCL creates a communicator at its first collective,
so it costs nothing where the overlap is off.)
The object is passed explicitly; nothing here is global.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megacoca.config.layout import Layout, infer_dp


@dataclass
class ParallelDims:
    dp: int
    tp: int
    pp: int
    world_size: int
    rank: int = 0
    groups: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        try:
            self.dp = infer_dp(self.dp, self.tp, self.pp, self.world_size)
        except ValueError as error:
            raise ValueError(f"ParallelDims: {error}") from None
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"ParallelDims: rank {self.rank} is outside world size {self.world_size}")

    @classmethod
    def from_config(cls, parallel, world_size: int, rank: int = 0) -> "ParallelDims":
        """The degrees a JobConfig's `parallel` section asks for, over `world_size` ranks (not built yet)."""
        return cls(dp=parallel.dp, tp=parallel.tp, pp=parallel.pp, world_size=world_size, rank=rank)

    @classmethod
    def from_layout(cls, layout: Layout, rank: int = 0) -> "ParallelDims":
        """The process groups of `layout`'s degrees (not built yet)."""
        return cls(dp=layout.dp, tp=layout.tp, pp=layout.pp, world_size=layout.world, rank=rank)

    # -------------------------------------------------------------------------------- grid and groups

    @property
    def grid(self) -> torch.Tensor:
        return torch.arange(self.world_size).view(self.dp, self.pp, self.tp)

    @property
    def coords(self) -> tuple[int, int, int]:
        """(dp_rank, pp_rank, tp_rank) of this rank."""
        index = (self.grid == self.rank).nonzero()[0]
        return int(index[0]), int(index[1]), int(index[2])

    def group_ranks(self) -> dict[str, list[list[int]]]:
        """Every group of each kind as rank lists, in a fixed order that all ranks share."""
        grid = self.grid
        return {
            "dp": [grid[:, p, t].tolist() for p in range(self.pp) for t in range(self.tp)],
            "pp": [grid[d, :, t].tolist() for d in range(self.dp) for t in range(self.tp)],
            "tp": [grid[d, p, :].tolist() for d in range(self.dp) for p in range(self.pp)],
            "mp": [grid[d].flatten().tolist() for d in range(self.dp)],
        }

    def build(self, timeout=None) -> "ParallelDims":
        """Create the process groups; every rank must call this (new_group is collective). `timeout` (a
        timedelta): how long their collectives wait for a peer (None: torch's default, not the world group's)."""
        if not dist.is_initialized():
            raise RuntimeError("ParallelDims.build() needs an initialised default process group")
        if dist.get_world_size() != self.world_size:
            raise ValueError(f"ParallelDims: world size {self.world_size} != the process group's "
                             f"{dist.get_world_size()}")
        self.rank = dist.get_rank()
        for kind, all_ranks in self.group_ranks().items():
            for ranks in all_ranks:
                if len(ranks) == self.world_size:
                    group = dist.group.WORLD  # no second communicator over the same ranks
                else:
                    group = dist.new_group(ranks, timeout=timeout)
                if self.rank in ranks:
                    self.groups[kind] = (group, ranks)
        if self.tp > 1:
            for ranks in self.group_ranks()["tp"]:
                group = dist.new_group(ranks, timeout=timeout)  # never WORLD: a communicator of its own
                if self.rank in ranks:
                    self.groups["tp_text"] = (group, ranks)
        return self

    def _group(self, kind: str):
        if kind not in self.groups:
            raise RuntimeError("ParallelDims: call build() after init_process_group before using groups")
        return self.groups[kind][0]

    # ----------------------------------------------------------------------------------- accessors

    @property
    def dp_size(self) -> int:
        return self.dp

    @property
    def tp_size(self) -> int:
        return self.tp

    @property
    def pp_size(self) -> int:
        return self.pp

    @property
    def dp_rank(self) -> int:
        return self.coords[0]

    @property
    def pp_rank(self) -> int:
        return self.coords[1]

    @property
    def tp_rank(self) -> int:
        return self.coords[2]

    @property
    def dp_group(self):
        return self._group("dp")

    @property
    def tp_group(self):
        return self._group("tp")

    @property
    def pp_group(self):
        return self._group("pp")

    @property
    def text_tp_group(self):
        """The unimodal text tower's communicator over this rank's tensor-parallel ranks, distinct from `tp_group`
        (megacoca.parallel.overlap); with tp = 1 there is no tensor-parallel collective and this is `tp_group`."""
        return self._group("tp_text" if self.tp > 1 else "tp")

    @property
    def mp_group(self):
        return self._group("mp")

    @property
    def dp_ranks(self) -> list[int]:
        return self._ranks("dp")

    @property
    def pp_ranks(self) -> list[int]:
        """The global ranks of this rank's pipeline, stage 0 first."""
        return self._ranks("pp")

    def _ranks(self, kind: str) -> list[int]:
        if kind in self.groups:
            return self.groups[kind][1]
        return next(ranks for ranks in self.group_ranks()[kind] if self.rank in ranks)

    def mpu(self) -> "DeepSpeedMPU":
        return DeepSpeedMPU(self)

    def __str__(self) -> str:
        return f"dp={self.dp} pp={self.pp} tp={self.tp} (world {self.world_size})"


class DeepSpeedMPU:
    """The Megatron-style `mpu` object `deepspeed.initialize(mpu=...)` queries, backed by a ParallelDims.

    "Model parallel" is the (pp, tp) slab, as in Megatron; the slice-parallel names are the tensor group,
    as DeepSpeed's pipeline topology uses them. No sequence-parallel methods: DeepSpeed then assumes 1.
    """

    def __init__(self, dims: ParallelDims):
        self.dims = dims

    def get_data_parallel_group(self):
        return self.dims.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.dims.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dims.dp_size

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.dims.dp_ranks)

    def get_model_parallel_group(self):
        return self.dims.mp_group

    def get_model_parallel_rank(self) -> int:
        # The tensor rank, not the rank in the (pp, tp) slab: DeepSpeed counts a replicated parameter's gradient
        # in its norms only where this is 0, then sums over the model-parallel group, so with the slab rank the
        # replicated parameters of every stage but the first would be left out. (With pp = 1 the two agree.)
        # Checkpoint file names, which must differ per stage, are set by the Trainer.
        return self.dims.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.dims.pp_size * self.dims.tp_size

    def get_tensor_model_parallel_group(self):
        return self.dims.tp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.dims.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.dims.tp_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.dims._ranks("tp")[0]

    def get_pipeline_model_parallel_group(self):
        return self.dims.pp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.dims.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.dims.pp_size

    get_pipe_parallel_group = get_pipeline_model_parallel_group
    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
    get_slice_parallel_group = get_tensor_model_parallel_group
    get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size
