"""Device and cluster profiles: what the planner's time model divides by.

A `DeviceProfile` holds achieved rates, not datasheet peaks: dense matmul FLOP/s on transformer-sized GEMMs, a
fixed cost per transformer block and micro-batch (launches, LayerNorms, attention's non-GEMM work, framework
hooks: what a FLOP count misses), the bus bandwidth of a ring collective inside a node and across nodes, the
latency of one collective, and the memory bandwidth the optimizer step streams at. Presets for A100-40/80GB,
H100 and H200 nodes come from the datasheet peaks times published efficiencies (named in `source`); a profile
from `megacoca plan --calibrate` (megacoca.plan.calibrate) is measured on the machine it ran on and says so.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

from megacoca.metrics.peak import PEAK_FLOPS

GB = 1e9


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
    # each ZeRO stage ({"0": s, "1": s, "2": s, "3": s}): gradient hooks and bucket copies (1/2), the per-module
    # gather and release with its collective (3)
    tensor_overhead_s: dict = field(default_factory=lambda: {"0": 0.0, "1": 0.0, "2": 0.0, "3": 0.0})
    # seconds per micro-batch that DeepSpeed's engine adds under each ZeRO stage whatever the model's size (its
    # collectives' latencies, hook bookkeeping): {"0": s, ...}
    micro_overhead_s: dict = field(default_factory=lambda: {"0": 0.0, "1": 0.0, "2": 0.0, "3": 0.0})
    # achieved FLOP/s of whole transformer blocks, forward + backward, per precision (a calibrated profile): the
    # matmuls and the memory-bound work between them together; None: matmul rate + elementwise bytes / memory_bw
    block_flops: dict | None = None

    def block_overhead(self, precision: str) -> float:
        value = self.block_overhead_s
        return float(value.get(precision, max(value.values())) if isinstance(value, dict) else value)

    def step_overhead(self, zero: int) -> float:
        value = self.step_overhead_s
        return float(value.get(str(zero), max(value.values())) if isinstance(value, dict) else value)

    def tensor_overhead(self, zero: int) -> float:
        return float(self.tensor_overhead_s.get(str(zero), 0.0))

    def micro_overhead(self, zero: int) -> float:
        return float(self.micro_overhead_s.get(str(zero), 0.0))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "DeviceProfile":
        return cls(**json.loads(text))

    @classmethod
    def load(cls, path: str) -> "DeviceProfile":
        with open(path) as f:
            return cls.from_json(f.read())

    def with_nodes(self, gpus_per_node: int) -> "DeviceProfile":
        return replace(self, gpus_per_node=gpus_per_node)


# Published efficiencies the presets assume (REFERENCE.md sections 4-6): dense bf16 GEMMs of transformer shapes reach
# about 70% of peak on A100/H100 (cuBLAS); NCCL ring all-reduce bus bandwidth about 80% of NVLink's per-direction
# rate inside a node; one 200 Gb/s (A100 nodes) or 400 Gb/s (H100/H200 nodes) NIC per GPU across nodes at about 80%.
_GEMM_EFFICIENCY = 0.70
_LINK_EFFICIENCY = 0.80


def _preset(name: str, device: str, memory_gb: float, nvlink_gbs: float, nic_gbit: float, hbm_tbs: float
            ) -> DeviceProfile:
    peak = PEAK_FLOPS[device]
    return DeviceProfile(
        name=name, peak_flops=dict(peak), matmul_flops={k: v * _GEMM_EFFICIENCY for k, v in peak.items()},
        block_overhead_s=60e-6, step_overhead_s=5e-3,
        # DeepSpeed's per-tensor work on a GPU: hooks and bucket copies (~10 us), ZeRO-3's per-module gather and
        # release around an NCCL all-gather (~60 us at 30 us latency): estimates, not measured here
        tensor_overhead_s={"0": 0.0, "1": 10e-6, "2": 10e-6, "3": 60e-6},
        intra_node_bw=nvlink_gbs * GB * _LINK_EFFICIENCY, inter_node_bw=nic_gbit / 8 * GB * _LINK_EFFICIENCY,
        collective_latency_s=30e-6, memory_bw=hbm_tbs * 1e12 * 0.8, memory_bytes=memory_gb * GB, gpus_per_node=8,
        source=f"preset: {device} datasheet peak x {_GEMM_EFFICIENCY} (GEMMs), NVLink {nvlink_gbs:.0f} GB/s and a "
               f"{nic_gbit:.0f} Gb/s NIC per GPU x {_LINK_EFFICIENCY}; not calibrated")


PRESETS: dict[str, DeviceProfile] = {
    "a100-40gb": _preset("a100-40gb", "A100", 40, 300, 200, 1.555),
    "a100-80gb": _preset("a100-80gb", "A100", 80, 300, 200, 2.039),
    "h100": _preset("h100", "H100", 80, 450, 400, 3.35),
    "h200": _preset("h200", "H200", 141, 450, 400, 4.8),
}


def get_profile(spec: str) -> DeviceProfile:
    """A preset name or the path of a profile JSON (from `megacoca plan --calibrate`)."""
    if spec in PRESETS:
        return PRESETS[spec]
    try:
        return DeviceProfile.load(spec)
    except FileNotFoundError:
        raise ValueError(f"unknown cluster profile {spec!r}: a preset ({', '.join(PRESETS)}) or a profile JSON "
                         "from `megacoca plan --calibrate`") from None
    except (TypeError, ValueError) as error:
        raise ValueError(f"{spec}: not a device profile ({error})") from None
