"""3D rotary position embedding with interleaved pairs (spec §2.6, §3.3).

Head dim split [t | h | w] = [d/4 | 3d/8 | 3d/8]; pair k of an axis with sub-dim m has frequency
theta^(-2k/m); head-dim elements (2k, 2k+1) form a pair (GPT-J style, not NeoX half-split).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rope_3d_angles(num_frames: int, height: int, width: int, head_dim: int,
                   theta: float = 10000.0) -> np.ndarray:
  """float64 [T*h*w, head_dim/2] angles for tokens in (t, y, x) order."""
  if head_dim % 8:
    raise ValueError(f"3D RoPE needs head_dim divisible by 8, got {head_dim}")
  dims = (head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8)

  def freqs(m: int) -> np.ndarray:
    return theta ** (-np.arange(0, m, 2, dtype=np.float64) / m)  # [m/2]

  t, y, x = np.meshgrid(np.arange(num_frames), np.arange(height), np.arange(width), indexing="ij")
  parts = [pos.reshape(-1, 1).astype(np.float64) * freqs(m)[None, :]
           for pos, m in zip((t, y, x), dims)]
  return np.concatenate(parts, axis=-1)  # [T*h*w, d/2]


def apply_rope_interleaved(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates pairs (2k, 2k+1) of the head dim: x [..., L, H, d], cos/sin [L, d/2] (same for all H)."""
  a, b = x[..., 0::2], x[..., 1::2]  # [..., L, H, d/2]
  c, s = cos[:, None, :], sin[:, None, :]  # [L, 1, d/2]
  out = jnp.stack([a * c - b * s, b * c + a * s], axis=-1)  # [..., L, H, d/2, 2]
  return out.reshape(x.shape)
