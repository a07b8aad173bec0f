"""The GPU presets of the planner, and `get_profile`: a preset by name or a profile JSON by path.

Presets for A100-40/80GB, H100 and H200 nodes are the datasheet peaks (megacoca.metrics.peak) times efficiencies
held to published training runs where there are any (benchmarks/published_runs.py, benchmarks/plan_published.py)
and assumed where there are none; each profile's `source` says which. Nothing in them is measured on the cluster it
describes: `megacoca plan --calibrate` does that. A calibration on one GPU (megacoca.plan.fit) borrows the link
figures of its GPU's preset (`gpu_preset`).
"""

from __future__ import annotations

from megacoca.metrics.peak import PEAK_FLOPS
from megacoca.plan.profile import DeviceProfile

GB = 1e9

# The bf16 matmul rate of whole transformer blocks in a training step, as a share of the dense bf16 peak: 0.45, fitted
# to the best-engineered published CLIP run, NVIDIA NeMo's ViT-g/14 on one DGX A100 (8 x A100-80GB, one node: no
# inter-node traffic; 559 samples/s, 69.9 per GPU, 39% MFU; the NeMo Framework user guide's "CLIP > Performance"
# page). Its shape and layout (benchmarks/published_runs.py: ZeRO-1, 88 per GPU, no recompute) predict 72.3 per GPU
# at 0.45, on a model 2.9% smaller than NeMo's (which pads the ViT to 264 tokens and the text to 80), so the same
# work per second. The figure is below what one cuBLAS GEMM of these shapes reaches (the 0.7 these presets assumed
# before, which put the run at 107 per GPU, 1.53x the published): it also carries what the preset's time model does
# not cost on its own (NeMo's unfused attention and bias + GELU, launches, the data pipeline), so it is the rate of a
# whole step's matmuls. benchmarks/plan_published.py sets it beside six more runs (NeMo at 16 nodes: 0.98x).
# H100 and H200 carry the A100's share: their one published CLIP point (NeMo's ViT-g/14 on DGX H100, 21% MFU) reused
# the A100 configuration untuned (no Transformer Engine, unfused attention, the same micro-batch) and is not what a
# tuned run reaches; Megatron-LM's tuned GPT training reaches about the same share of peak on both (52% on 3,072
# A100s, Narayanan et al. 2021, arXiv 2104.04473; 41-49% MFU on H100, the "Training Speed and Scalability" table
# of github.com/NVIDIA/Megatron-LM's README.md). fp32 matmuls: no published run; 0.7 of the fp32 peak assumed.
_BLOCK_EFFICIENCY = {"bf16": 0.45, "fp32": 0.70}
_CALIBRATED_TO = "NeMo CLIP ViT-g/14 on 8 A100-80GB, 69.9 samples/s/GPU"
# NCCL ring all-reduce bus bandwidth ("busbw" as doc/PERFORMANCE.md of github.com/NVIDIA/nccl-tests defines it)
# about 80% of NVLink's per-direction rate inside a node; one 200 Gb/s (A100 nodes) or 400 Gb/s (H100/H200 nodes) NIC
# per GPU across nodes (NVIDIA's DGX A100 / DGX H100 user guides) at about 80%. Assumed: the published runs do not
# pin them (NeMo's 16-node run overlaps its optimizer's all-gather, which DeepSpeed does not).
_LINK_EFFICIENCY = 0.80


def _preset(name: str, device: str, memory_gb: float, nvlink_gbs: float, nic_gbit: float, hbm_tbs: float
            ) -> DeviceProfile:
    peak = PEAK_FLOPS[device]
    fitted = "fitted to" if device == "A100" else "the A100 share fitted to"
    return DeviceProfile(
        name=name, peak_flops=dict(peak), matmul_flops={k: v * _BLOCK_EFFICIENCY[k] for k, v in peak.items()},
        block_overhead_s=60e-6, step_overhead_s=5e-3,
        # DeepSpeed's per-tensor work on a GPU: hooks and bucket copies (~10 us), ZeRO-3's per-module gather and
        # release around an NCCL all-gather (~60 us at 30 us latency): estimates, not measured here
        tensor_overhead_s={"0": 0.0, "1": 10e-6, "2": 10e-6, "3": 60e-6},
        intra_node_bw=nvlink_gbs * GB * _LINK_EFFICIENCY, inter_node_bw=nic_gbit / 8 * GB * _LINK_EFFICIENCY,
        collective_latency_s=30e-6, memory_bw=hbm_tbs * 1e12 * 0.8, memory_bytes=memory_gb * GB, gpus_per_node=8,
        source=f"preset: {device} bf16 peak x {_BLOCK_EFFICIENCY['bf16']} for whole blocks' matmuls, {fitted} "
               f"{_CALIBRATED_TO} (benchmarks/plan_published.py); NVLink {nvlink_gbs:.0f} GB/s and a "
               f"{nic_gbit:.0f} Gb/s NIC per GPU x {_LINK_EFFICIENCY} assumed; not calibrated on this cluster")


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
