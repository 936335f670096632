"""The latent scale factor shared by data, training and decoding (spec §5.7).

The released pipeline uses unscaled latents (factor 1.0) end to end; CogVideoX-5B itself was
pretrained with latents x 0.7. Training multiplies VAE posterior samples by the factor, decoding
divides by it; use the same config value for both.
"""

from __future__ import annotations

import jax

DEFAULT_LATENT_SCALE = 1.0     # as released (official model.scale_factor / eval.vae_scale_factor)
COGVIDEOX_LATENT_SCALE = 0.7   # HF CogVideoX VAE `scaling_factor`


def _check(factor: float) -> float:
  """Refuses non-positive factors."""
  if not factor > 0:
    raise ValueError(f"latent scale factor must be > 0, got {factor}")
  return float(factor)


def to_model_latents(vae_latents: jax.Array, factor: float = DEFAULT_LATENT_SCALE) -> jax.Array:
  """VAE posterior sample -> what the DiT sees (training data): factor * z."""
  return vae_latents * _check(factor)


def to_vae_latents(model_latents: jax.Array, factor: float = DEFAULT_LATENT_SCALE) -> jax.Array:
  """Sampled latents -> VAE decoder input: z / factor."""
  return model_latents / _check(factor)
