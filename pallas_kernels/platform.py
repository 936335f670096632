"""Where the Mosaic GPU kernels can run: Hopper (sm_90) GPUs, or anywhere in interpret mode."""

from __future__ import annotations

import jax


def not_hopper_reason() -> str | None:
  """None on a Hopper GPU (compute capability 9.0), else why the kernels cannot run here."""
  dev = jax.devices()[0]
  if dev.platform != "gpu" or getattr(dev, "compute_capability", "") not in ("9.0",):
    return f"device {dev.platform}/{getattr(dev, 'device_kind', '?')} is not a Hopper GPU"
  return None
