"""Fused TTT-MLP scan for Hopper (Mosaic GPU), with the XLA scan as reference and fallback."""

from pallas_kernels.ttt_mlp.ttt_mlp import ttt_mlp_pallas, kernel_supported  # noqa: F401
