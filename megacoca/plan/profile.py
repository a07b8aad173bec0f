"""Device and cluster profiles: what the planner's time model divides by.

A `DeviceProfile` holds achieved rates, not datasheet peaks: dense matmul FLOP/s on transformer-sized GEMMs, a
fixed cost per transformer block and micro-batch (launches, LayerNorms, attention's non-GEMM work, framework
hooks: what a FLOP count misses), the bus bandwidth of a ring collective inside a node and across nodes, the
latency of one collective, and the memory bandwidth the optimizer step streams at. The presets for A100-40/80GB,
H100 and H200 nodes are in megacoca.plan.presets; a profile from `megacoca plan --calibrate`
(megacoca.profiling.calibrate measures, megacoca.plan.fit turns the measurements into a profile) is measured on
the machine it ran on and says so. `save_profile` writes one as JSON, `DeviceProfile.load` reads it back.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    peak_flops: dict  # {"bf16": FLOP/s, "fp32": FLOP/s}: the datasheet figure MFU is reported against
    matmul_flops: dict  # achieved dense matmul FLOP/s per precision
    block_overhead_s: float | dict  # seconds per transformer block per micro-batch (forward + backward) beyond
    # its FLOPs: one figure, or {precision: seconds}
    step_overhead_s: float | dict  # seconds per optimizer step beyond streaming the states: one figure, or
    # {ZeRO stage as str: seconds} (the engine's own step: flat-buffer copies, gradient norm, all-gathers)
    intra_node_bw: float  # bytes/s of ring all-reduce bus bandwidth between GPUs of one node
    inter_node_bw: float  # bytes/s per GPU between nodes
    collective_latency_s: float  # seconds per collective call
    memory_bw: float  # bytes/s the optimizer step streams its states at
    memory_bytes: float  # device memory per GPU
    gpus_per_node: int
    source: str  # where the numbers come from
    # seconds per trainable parameter tensor per micro-batch (forward + backward) that DeepSpeed's engine adds under
    # each ZeRO stage ({"0": s, "1": s, "2": s, "3": s}; a calibration also keys "3/fp32", ZeRO-3 measured in fp32 on
    # its own; every engine cost below is keyed the same way): gradient hooks and bucket copies (1/2), the per-module
    # gather and release with its collective (3)
    tensor_overhead_s: dict = field(default_factory=lambda: {"0": 0.0, "1": 0.0, "2": 0.0, "3": 0.0})
    # seconds per micro-batch that DeepSpeed's engine adds under each ZeRO stage whatever the model's size (its
    # collectives' latencies, hook bookkeeping): {"0": s, ...}
    micro_overhead_s: dict = field(default_factory=lambda: {"0": 0.0, "1": 0.0, "2": 0.0, "3": 0.0})
    # what whole transformer blocks achieve, forward + backward, per precision (a calibrated profile), as the rates
    # megacoca.plan.timing.Work's quantities are divided by: {precision: {"flops": matmul FLOP/s, "elementwise":
    # elements/s of the memory-bound work, "attention": attention-score elements/s, "attention_rows": rows/s}} (a
    # kind without a rate costs nothing); None (a preset): the matmul rate, and the elementwise bytes at memory_bw
    block_rates: dict | None = None
    # the share of a micro-batch's compute that data-parallel traffic hides behind (ZeRO-1/2's reduce-scatter under
    # backward, ZeRO-3's prefetched gathers): an assumption on a GPU (streams contend for memory bandwidth, the first
    # gather and the last reduce are never hidden); 0 on CPU ranks, whose collectives take the cores compute needs
    overlap: float = 0.7
    # seconds per parameter of this rank's model per micro-batch that the engine adds under each ZeRO stage beyond
    # its collectives (gradient accumulation and bucket copies, ZeRO-3's gathered copies): {"0": s, ...}
    micro_param_s: dict = field(default_factory=dict)
    # seconds per parameter of this rank's optimizer partition that the step takes under each ZeRO stage beyond its
    # collectives (Adam, the precision casts, the gradient norm): {"0": s, ...}; absent: 32 bytes at memory_bw
    step_param_s: dict = field(default_factory=dict)
    # seconds per sample per micro-batch that a whole CoCa costs beyond its blocks' work (embeddings, the losses, the
    # poolers' small ops), measured on real Trainer steps (megacoca.profiling.calibrate.calibrate_trainer)
    sample_overhead_s: float = 0.0
    # seconds per micro-batch on every rank that megacoca's tensor-parallel layers ("tp") and pipeline runner ("pp")
    # add beyond the model's work and the collectives the time model counts, measured the same way
    parallel_overhead_s: dict = field(default_factory=dict)
    # the group size collective_latency_s was measured at (a calibrated profile); a ring's latency grows with its
    # hops, so a group of g ranks pays (g - 1) / (collective_ranks - 1) of it. 0: the same for any group (presets)
    collective_ranks: int = 0

    def block_overhead(self, precision: str) -> float:
        value = self.block_overhead_s
        return float(value.get(precision, max(value.values())) if isinstance(value, dict) else value)

    @staticmethod
    def _engine(table: dict, zero: int, precision: str | None, default: float = 0.0) -> float:
        """An engine cost measured per ZeRO stage: the stage in this precision where it was measured on its own
        ("3/fp32"), else the stage's (measured in the precision megacoca ships it with)."""
        if precision is not None and f"{zero}/{precision}" in table:
            return float(table[f"{zero}/{precision}"])
        return float(table.get(str(zero), default))

    def step_overhead(self, zero: int, precision: str | None = None) -> float:
        value = self.step_overhead_s
        if not isinstance(value, dict):
            return float(value)
        return self._engine(value, zero, precision, max(value.values()))

    def tensor_overhead(self, zero: int, precision: str | None = None) -> float:
        return self._engine(self.tensor_overhead_s, zero, precision)

    def micro_overhead(self, zero: int, precision: str | None = None) -> float:
        return self._engine(self.micro_overhead_s, zero, precision)

    def latency(self, ranks: int) -> float:
        """Seconds of latency of one collective over `ranks` ranks."""
        if self.collective_ranks > 1:
            return self.collective_latency_s * max(ranks - 1, 1) / (self.collective_ranks - 1)
        return self.collective_latency_s

    def parallel_overhead(self, kind: str) -> float:
        return float(self.parallel_overhead_s.get(kind, 0.0))

    def micro_param(self, zero: int, precision: str | None = None) -> float:
        return self._engine(self.micro_param_s, zero, precision)

    def step_param(self, zero: int, precision: str | None = None) -> float:
        """Seconds per parameter of the optimizer partition: measured, or Adam's 32 bytes (fp32 master, gradient,
        two moments, read and written) streamed at memory_bw."""
        return self._engine(self.step_param_s, zero, precision, 32 / self.memory_bw)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "DeviceProfile":
        fields = json.loads(text)
        legacy = fields.pop("block_flops", None)  # a profile from before block_rates: one whole-block FLOP rate
        if legacy and "block_rates" not in fields:
            fields["block_rates"] = {p: {"flops": rate} for p, rate in legacy.items()}
        return cls(**fields)

    @classmethod
    def load(cls, path: str) -> "DeviceProfile":
        with open(path) as f:
            return cls.from_json(f.read())

    def with_nodes(self, gpus_per_node: int) -> "DeviceProfile":
        return replace(self, gpus_per_node=gpus_per_node)


def save_profile(profile: DeviceProfile, path: str) -> None:
    """Write the profile as JSON (DeviceProfile.load / megacoca.plan.presets.get_profile read it back), replacing
    any file there."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as f:
        f.write(profile.to_json() + "\n")
    os.replace(f.name, path)
