"""Zero-terminal-SNR DDPM schedule of TTT-Video / CogVideoX (spec §5.1).

The tables are built on the host with NumPy: betas and cumulative products in float64, then, as the
official `ZeroSNRDDPMDiscretization.get_sigmas` does, the square root and the rescale in float32.
The values called "sigmas" in the official code are a_t = sqrt(alpha_bar_t), rescaled so that the
last index of the chosen set maps to exactly 0.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
LINEAR_START = 0.00085
LINEAR_END = 0.012
NUM_SAMPLING_STEPS = 50


def betas(num_timesteps: int = NUM_TRAIN_TIMESTEPS, linear_start: float = LINEAR_START,
          linear_end: float = LINEAR_END) -> np.ndarray:
  """"Scaled linear" betas: (linspace(sqrt(start), sqrt(end), N))^2 in float64, [N]."""
  return np.linspace(linear_start ** 0.5, linear_end ** 0.5, num_timesteps, dtype=np.float64) ** 2


def alphas_cumprod(num_timesteps: int = NUM_TRAIN_TIMESTEPS, shift_scale: float = 1.0) -> np.ndarray:
  """alpha_bar_t = prod_{s<=t} (1 - beta_s), optionally SNR-shifted by k: ab / (k + (1-k) ab); float64 [N]."""
  ab = np.cumprod(1.0 - betas(num_timesteps), axis=0)
  return ab / (shift_scale + (1.0 - shift_scale) * ab)


def sampling_timesteps(num_steps: int = NUM_SAMPLING_STEPS,
                       num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
  """Ascending timesteps floor(linspace(N-1, 0, n, endpoint=False))[::-1]: 19, 39, ..., 999 for n=50."""
  if not 0 < num_steps <= num_timesteps:
    raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
  steps = np.linspace(num_timesteps - 1, 0, num_steps, endpoint=False).astype(np.int64)[::-1]
  return np.ascontiguousarray(steps)


def zero_snr_rescale(alpha_bar: np.ndarray) -> np.ndarray:
  """a' = (a - a_last) * a_first / (a_first - a_last) with a = sqrt(alpha_bar) in float32 (ascending t)."""
  a = np.sqrt(alpha_bar.astype(np.float32))                         # [K] float32
  a_first, a_last = a[0], a[-1]
  return ((a - a_last) * (a_first / (a_first - a_last))).astype(np.float32)


def training_table(num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
  """a'_t for t = 0..N-1 (rescale over all indices): float32 [N], a'_0 = 0.9995749, a'_{N-1} = 0."""
  return zero_snr_rescale(alphas_cumprod(num_timesteps))


def sampling_table(num_steps: int = NUM_SAMPLING_STEPS,
                   num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[np.ndarray, np.ndarray]:
  """(timesteps ascending [n], a' rescaled over that subset [n]) — e.g. t=19 -> 0.9910823, t=999 -> 0."""
  ts = sampling_timesteps(num_steps, num_timesteps)
  return ts, zero_snr_rescale(alphas_cumprod(num_timesteps)[ts])


def snap_to_training_index(a: np.ndarray, table: np.ndarray | None = None) -> np.ndarray:
  """Index of the nearest training-table value to each a (first index on ties), as the official denoiser."""
  table = training_table() if table is None else table
  a = np.asarray(a, dtype=np.float32)
  return np.abs(a[..., None] - table).argmin(axis=-1)                # [...]


def as_jnp(x: np.ndarray) -> jnp.ndarray:
  """Exposes a host table as a jnp array (keeps its dtype)."""
  return jnp.asarray(x)
