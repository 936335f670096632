"""Fused TTT-Linear scan for Hopper (Mosaic GPU), with the XLA scan as reference and fallback."""

from pallas_kernels.ttt_linear.ttt_linear import kernel_supported, ttt_linear_pallas  # noqa: F401
