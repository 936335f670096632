"""Pallas GPU kernels (Mosaic GPU) with XLA references."""
