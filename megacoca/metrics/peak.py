"""Peak dense FLOP/s per device, for MFU. Unknown devices (CPUs included) give None, never a guess.

Numbers are the vendors' dense (no 2:4 sparsity) tensor-core figures for bf16, and the non-tensor-core
fp32 figure for fp32 (megacoca does not enable TF32 for you). Sources: NVIDIA A100/H100/H200/L40S/L4/A10
datasheets, AMD MI250X/MI300X datasheets.
"""

from __future__ import annotations

import torch

# key: a substring of torch.cuda.get_device_name(); the longest matching key wins ("H100 PCIe" over "H100").
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
    "A800": {"bf16": 312e12, "fp32": 19.5e12},
    "H100": {"bf16": 989.4e12, "fp32": 66.9e12},  # SXM
    "H100 PCIe": {"bf16": 756.5e12, "fp32": 51.2e12},
    "H100 NVL": {"bf16": 835.5e12, "fp32": 60.0e12},
    "H800": {"bf16": 989.4e12, "fp32": 66.9e12},
    "H200": {"bf16": 989.4e12, "fp32": 66.9e12},
    "GH200": {"bf16": 989.4e12, "fp32": 66.9e12},
    "B200": {"bf16": 2250e12, "fp32": 80e12},
    "L40S": {"bf16": 362.1e12, "fp32": 91.6e12},
    "L40": {"bf16": 181e12, "fp32": 90.5e12},
    "L4": {"bf16": 121e12, "fp32": 30.3e12},
    "A10": {"bf16": 125e12, "fp32": 31.2e12},
    "MI250X": {"bf16": 383e12, "fp32": 47.9e12},
    "MI300X": {"bf16": 1307.4e12, "fp32": 163.4e12},
}


def peak_flops(device_name: str | None, precision: str) -> float | None:
    """Peak FLOP/s of one device for "bf16" or "fp32"; None when the device or precision is unknown."""
    if not device_name:
        return None
    name = device_name.upper()
    matches = [key for key in PEAK_FLOPS if key.upper() in name]
    if not matches:
        return None
    return PEAK_FLOPS[max(matches, key=len)].get(precision)


def current_device_name() -> str | None:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return None
