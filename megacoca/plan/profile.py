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
    # poolers' small ops), measured on real Trainer steps (megacoca.plan.calibrate.calibrate_trainer)
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

    def step_overhead(self, zero: int) -> float:
        value = self.step_overhead_s
        return float(value.get(str(zero), max(value.values())) if isinstance(value, dict) else value)

    def tensor_overhead(self, zero: int) -> float:
        return float(self.tensor_overhead_s.get(str(zero), 0.0))

    def micro_overhead(self, zero: int) -> float:
        return float(self.micro_overhead_s.get(str(zero), 0.0))

    def latency(self, ranks: int) -> float:
        """Seconds of latency of one collective over `ranks` ranks."""
        if self.collective_ranks > 1:
            return self.collective_latency_s * max(ranks - 1, 1) / (self.collective_ranks - 1)
        return self.collective_latency_s

    def parallel_overhead(self, kind: str) -> float:
        return float(self.parallel_overhead_s.get(kind, 0.0))

    def micro_param(self, zero: int) -> float:
        return float(self.micro_param_s.get(str(zero), 0.0))

    def step_param(self, zero: int) -> float:
        """Seconds per parameter of the optimizer partition: measured, or Adam's 32 bytes (fp32 master, gradient,
        two moments, read and written) streamed at memory_bw."""
        return float(self.step_param_s.get(str(zero), 32 / self.memory_bw))

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


# Efficiencies the presets assume (estimates until `megacoca plan --calibrate` measures a node): dense bf16 GEMMs of
# transformer shapes reach about 70% of the datasheet peak on A100/H100 (whole GPT training steps reach 41-49% MFU on
# H100: the "Training Speed and Scalability" table of github.com/NVIDIA/Megatron-LM's README.md); NCCL ring
# all-reduce bus bandwidth ("busbw" as doc/PERFORMANCE.md of github.com/NVIDIA/nccl-tests defines it) about 80% of
# NVLink's per-direction rate inside a node; one 200 Gb/s (A100 nodes) or 400 Gb/s (H100/H200 nodes) NIC per GPU
# across nodes (NVIDIA's DGX A100 / DGX H100 user guides) at about 80%.
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
