"""Classifier-free guidance: the dynamic CFG scale table (spec §5.4) and the unconditional branch (§5.5).

The official `DynamicCFG` evaluates s = 1 + scale (1 - cos(pi (k / N)^exp)) / 2 with k = N - t_i
(t_i the diffusion timestep, 999..19), not the step counter, which gives pseudo-random scales in
[1, 1 + scale]. "official" reproduces that on the host with Python floats (float64, integer
exponent); "monotone" uses k = i, the documented 1 -> 1 + scale ramp.

The released sampler's unconditional branch is T5 of each scene's `neg_text` (or "", see
`ttt_dit.data.storyboard.negative_texts`); `UNCOND_MODES` also offers CogVideoX pretraining's all-zero
embeddings.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

CFG_SCHEDULES = ("official", "monotone", "constant")
UNCOND_MODES = ("neg_text", "zeros")


def cfg_scales(timesteps_desc: Sequence[int], scale: float = 6.0, exp: int | float = 5,
               schedule: str = "official") -> np.ndarray:
  """Guidance scale per sampling step (step order, i.e. t descending), float64 [N]."""
  n = len(timesteps_desc)
  out = []
  for i, t in enumerate(timesteps_desc):
    if schedule == "official":
      k = n - int(t)
    elif schedule == "monotone":
      k = i
    elif schedule == "constant":
      out.append(float(scale))
      continue
    else:
      raise ValueError(f"unknown cfg_schedule {schedule!r}; expected one of {CFG_SCHEDULES}")
    out.append(1.0 + scale * (1.0 - math.cos(math.pi * (k / n) ** exp)) / 2.0)
  return np.asarray(out, dtype=np.float64)


def guide(d_uncond: jax.Array, d_cond: jax.Array, s: jax.Array) -> jax.Array:
  """D = D_u + s (D_c - D_u): guidance on the x0-prediction (equivalent to guiding v)."""
  return d_uncond + s * (d_cond - d_uncond)


def zero_text_like(text: jax.Array) -> jax.Array:
  """All-zero unconditional text (CogVideoX pretraining's convention; not the released sampler's)."""
  return jnp.zeros_like(text)
