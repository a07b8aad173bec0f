"""The collectives a CoCa really issues in one micro-batch, counted, against the planner's analytic count.

`count_collectives(cfg, tp, dp, batch, dtype, activation_checkpointing)` builds CoCa on the meta device,
parallelizes it with the project's own code (`parallelize`: the tensor-parallel layers of megacoca.parallel.tensor)
as rank 0 of a (dp x tp) world under torch's fake process group (collectives are no-ops: nothing is allocated and
no rank runs), and records every torch.distributed collective of one forward (model + CoCa loss) and backward
(`CollectiveLog`: the module's functions wrapped, which the layers look up at call time). `tp_counts` and
`analytic_counts` key the tensor-parallel group's calls and megacoca.plan.comm.analytic_comm's terms alike, by
(phase, reduce op, elements per call, bytes per element): equal counters mean the time model counts every
collective the layers issue, no more and no fewer (tests/unit/plan/test_comm.py; benchmarks/tensor_parallel.py
comm prints them for the paper's flavors).

The fake process group replaces the default group of the calling process: run this in a process of its own
(megacoca.launch.ranks with one rank and init=False, as the test does) or in a script.
"""

from __future__ import annotations

import collections
import inspect

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from megacoca.losses import CoCaLoss
from megacoca.models.coca import CoCa
from megacoca.parallel.dims import ParallelDims
from megacoca.parallel.parallelize import parallelize


def fake_world(world_size: int, rank: int) -> None:
    """A fake process group playing `rank` of `world_size` (collectives are no-ops)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


def meta_parallel_model(cfg, tp: int, dp: int, rank_in_tp: int = 0, activation_checkpointing: bool = False):
    """CoCa on the meta device, parallelized by the project's own code as rank (dp 0, tp `rank_in_tp`) of a
    (dp x tp) world under the fake process group. Returns (model, dims)."""
    world = dp * tp
    fake_world(world, rank_in_tp)  # grid (dp, 1, tp): rank r < tp is (dp 0, tp r)
    dims = ParallelDims(dp=dp, tp=tp, pp=1, world_size=world).build()
    assert dims.tp_rank == rank_in_tp and dims.dp_rank == 0, (dims.tp_rank, dims.dp_rank)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = CoCa(cfg)
    parallelize(model, dims, activation_checkpointing=activation_checkpointing)
    return model, dims


class CollectiveLog:
    """Wraps torch.distributed's collectives (module attributes, which the TP code looks up at call time) and
    records (phase, op, reduce op, group kind and size, dtype, elements, shape) of every call."""

    OPS = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "reduce_scatter",
           "broadcast", "all_to_all_single", "reduce")

    def __init__(self, groups: dict):
        self.groups = groups  # kind -> group object
        self.calls: list[dict] = []
        self.phase = "forward"
        self.saved: dict = {}

    def __enter__(self):
        for op in self.OPS:
            if hasattr(dist, op):
                self.saved[op] = getattr(dist, op)
                setattr(dist, op, self._wrap(op, self.saved[op]))
        return self

    def __exit__(self, *exc):
        for op, fn in self.saved.items():
            setattr(dist, op, fn)

    def _wrap(self, op, fn):
        signature = inspect.signature(fn)

        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            arguments = bound.arguments
            group = arguments.get("group")
            tensor = arguments.get("tensor", arguments.get("input", arguments.get("input_tensor")))
            size = dist.get_world_size(group)
            kind = next((k for k, g in self.groups.items() if g is group), "world" if group is None else "other")
            elements = tensor.numel() * (size if op == "all_gather" else 1)
            reduce = str(arguments.get("op", "SUM")).split(".")[-1] if op in ("all_reduce", "reduce") else ""
            self.calls.append({"phase": self.phase, "op": op, "reduce": reduce.upper(), "group": kind,
                               "group_size": size, "dtype": str(tensor.dtype).replace("torch.", ""),
                               "element_bytes": tensor.element_size(), "elements": elements,
                               "shape": list(tensor.shape)})
            return fn(*args, **kwargs)

        return wrapper


def count_collectives(cfg, tp: int, dp: int, batch: int, dtype, activation_checkpointing: bool) -> list[dict]:
    """Every collective of one forward (model + CoCa loss) and backward on the meta device as rank 0 of
    (dp x tp), as CollectiveLog records them (`group` "tp" for the tensor-parallel group)."""
    model, dims = meta_parallel_model(cfg, tp, dp, activation_checkpointing=activation_checkpointing)
    model.to(dtype)
    images = torch.empty(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device="meta", dtype=dtype)
    text = torch.zeros(batch, cfg.context_length, dtype=torch.long, device="meta")
    with CollectiveLog({"tp": dims.tp_group, "dp": dims.dp_group}) as log:
        out = model(images, text)
        loss, _ = CoCaLoss()(out, dp_group=dims.dp_group)
        log.phase = "backward"
        loss.backward()
    return log.calls


def tp_counts(calls: list[dict]) -> collections.Counter:
    """The tensor-parallel group's calls by (phase, reduce op, elements per call, bytes per element)."""
    return collections.Counter((c["phase"], c["reduce"], c["elements"], c["element_bytes"])
                               for c in calls if c["group"] == "tp")


def analytic_counts(terms: list[dict]) -> collections.Counter:
    """megacoca.plan.comm.analytic_comm's terms keyed as tp_counts keys the calls they stand for."""
    counts: collections.Counter = collections.Counter()
    for term in terms:
        counts[(term["phase"], term["reduce"], term["elements"], term["element_bytes"])] += term["calls"]
    return counts
