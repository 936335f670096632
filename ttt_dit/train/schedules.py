"""Learning-rate multipliers of spec §8.3 (warmup then linear / cosine), as optax schedules."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def lr_multiplier(kind: str, lr_peak: float, lr_end: float, warmup: int, total: int) -> optax.Schedule:
  """Multiplier on the group's peak lr at step s (counted from 0): warmup (s+1)/W, then linear|cosine."""
  if kind not in ("linear", "cosine", "constant"):
    raise ValueError(f"unknown schedule {kind!r}; expected 'linear', 'cosine' or 'constant'")
  span = max(1, total - warmup)
  ratio = lr_end / lr_peak

  def schedule(step):
    s = jnp.asarray(step, jnp.float32)
    warm = (s + 1.0) / max(1, warmup)
    frac = (s - warmup) / span
    if kind == "linear":
      after = 1.0 - jnp.minimum(frac, 1.0) * (1.0 - ratio)
    elif kind == "cosine":
      after = (lr_end + (lr_peak - lr_end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))) / lr_peak
    else:
      after = jnp.ones_like(s)
    return jnp.where(s < warmup, warm, after)

  return schedule


def lr_schedule(kind: str, lr_peak: float, lr_end: float, warmup: int, total: int) -> optax.Schedule:
  """Absolute learning rate = lr_peak * multiplier."""
  mult = lr_multiplier(kind, lr_peak, lr_end, warmup, total)
  return lambda step: lr_peak * mult(step)
