"""Fused Triton kernels for CoCa, imported as `megacoca_kernels`."""
