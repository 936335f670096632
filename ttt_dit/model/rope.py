"""Attention RoPE of the DiT (spec §2.6): window-local 3D rotary tables, plus a naive reference.

The angle layout and the pair rotation are shared with the TTT layer (`ttt_dit.ttt.rope`, global
positions); attention differs only in using frame positions 0..(window frames - 1) for every window
and in casting the cos/sin tables to the compute dtype ([QUIRK] of CogVideoX pretraining).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ttt_dit.ttt.rope import apply_rope_interleaved, rope_3d_angles

__all__ = ["attention_rope_tables", "apply_rope_interleaved", "apply_rope_reference", "rope_3d_angles"]


def attention_rope_tables(window_frames: int, height: int, width: int, head_dim: int,
                          theta: float, dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
  """cos/sin [window_frames*h*w, head_dim/2] for local positions, cast to the compute dtype."""
  ang = rope_3d_angles(window_frames, height, width, head_dim, theta)  # float64 [Lw, d/2]
  return jnp.asarray(np.cos(ang), dtype), jnp.asarray(np.sin(ang), dtype)


def apply_rope_reference(x: np.ndarray, num_frames: int, height: int, width: int,
                         theta: float = 10000.0) -> np.ndarray:
  """Naive per-token, per-pair loop (float64 numpy) rotating x [L, d] with 3D RoPE; for tests."""
  d = x.shape[-1]
  dims = (d // 4, d // 8 * 3, d // 8 * 3)
  out = np.array(x, np.float64)
  i = 0
  for t in range(num_frames):
    for yy in range(height):
      for xx in range(width):
        k = 0
        for pos, m in ((t, dims[0]), (yy, dims[1]), (xx, dims[2])):
          for j in range(m // 2):
            phi = pos * theta ** (-2 * j / m)
            a, b = x[i, 2 * k], x[i, 2 * k + 1]
            out[i, 2 * k] = a * np.cos(phi) - b * np.sin(phi)
            out[i, 2 * k + 1] = b * np.cos(phi) + a * np.sin(phi)
            k += 1
        i += 1
  return out
