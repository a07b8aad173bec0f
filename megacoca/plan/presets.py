"""The GPU presets of the planner, and `get_profile`: a preset by name or a profile JSON by path.

Presets for A100-40/80GB, H100 and H200 nodes come from the datasheet peaks (megacoca.metrics.peak) times
published efficiencies, named in each profile's `source`; nothing in them is measured. A calibration on one GPU
(megacoca.plan.fit) borrows the link figures of its GPU's preset (`gpu_preset`).
"""

from __future__ import annotations

from megacoca.metrics.peak import PEAK_FLOPS
from megacoca.plan.profile import DeviceProfile

GB = 1e9


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


def gpu_preset(name: str, memory: float) -> DeviceProfile | None:
    """The preset of a GPU by its device name (and memory in bytes: A100 40 or 80 GB); None for another GPU."""
    upper = name.upper()
    if "H200" in upper:
        return PRESETS["h200"]
    if "H100" in upper:
        return PRESETS["h100"]
    if "A100" in upper:
        return PRESETS["a100-80gb" if memory > 60e9 else "a100-40gb"]
    return None
