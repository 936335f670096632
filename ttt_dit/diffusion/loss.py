"""v-prediction training objective of TTT-Video (spec §5.2).

With a = a'_t from the training table, x_t = a x0 + sqrt(1-a^2) eps and v = a eps - sqrt(1-a^2) x0,
the official x0-form loss  w * (D - x0)^2  with  D = -sqrt(1-a^2) F + a x_t  and  w = 1/(1-a^2)
equals the plain v-MSE (F - v)^2. `v_prediction_loss` computes the latter; `x0_prediction_loss` the
former (reference; they agree up to rounding).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ttt_dit.diffusion import schedule

ApplyFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (latents, text, timesteps) -> F


def training_alphas(t: Int[Array, "B"]) -> Float[Array, "B"]:
  """a'_t from the 1000-step training table (float32)."""
  return jnp.asarray(schedule.training_table())[t]


def _bcast(a: Float[Array, "B"], like: jax.Array) -> jax.Array:
  """[B] -> [B, 1, ..., 1] matching like.ndim."""
  return a.reshape(a.shape + (1,) * (like.ndim - 1))


def add_noise(x0: Float[Array, "B T H W C"], noise: Float[Array, "B T H W C"],
              a: Float[Array, "B"]) -> Float[Array, "B T H W C"]:
  """x_t = a x0 + sqrt(1 - a^2) eps (float32)."""
  a = _bcast(a.astype(jnp.float32), x0)
  return a * x0.astype(jnp.float32) + jnp.sqrt(1.0 - a * a) * noise.astype(jnp.float32)


def v_target(x0: Float[Array, "B T H W C"], noise: Float[Array, "B T H W C"],
             a: Float[Array, "B"]) -> Float[Array, "B T H W C"]:
  """v = a eps - sqrt(1 - a^2) x0: what F is trained to equal."""
  a = _bcast(a.astype(jnp.float32), x0)
  return a * noise.astype(jnp.float32) - jnp.sqrt(1.0 - a * a) * x0.astype(jnp.float32)


def x0_from_v(x_t: jax.Array, f: jax.Array, a: Float[Array, "B"]) -> jax.Array:
  """D = c_out F + c_skip x_t = -sqrt(1 - a^2) F + a x_t (VideoScaling, c_in = 1)."""
  a = _bcast(a.astype(jnp.float32), x_t)
  return -jnp.sqrt(1.0 - a * a) * f.astype(jnp.float32) + a * x_t.astype(jnp.float32)


def v_prediction_loss(apply_fn: ApplyFn, x0: Float[Array, "B T H W C"], text: jax.Array,
                      t: Int[Array, "B"], noise: Float[Array, "B T H W C"]) -> Float[Array, ""]:
  """mean over elements and batch of (F(x_t, text, t) - v)^2, with a = training a'_t."""
  a = training_alphas(t)                                             # [B]
  x_t = add_noise(x0, noise, a)                                      # [B, T, H, W, C]
  f = apply_fn(x_t, text, t).astype(jnp.float32)                     # [B, T, H, W, C]
  return jnp.mean((f - v_target(x0, noise, a)) ** 2)


def x0_prediction_loss(apply_fn: ApplyFn, x0: Float[Array, "B T H W C"], text: jax.Array,
                       t: Int[Array, "B"], noise: Float[Array, "B T H W C"]) -> Float[Array, ""]:
  """Official form: mean of w (D - x0)^2 with w = 1/(1 - a^2) (reference for v_prediction_loss)."""
  a = training_alphas(t)                                             # [B]
  x_t = add_noise(x0, noise, a)
  d = x0_from_v(x_t, apply_fn(x_t, text, t), a)
  w = _bcast(1.0 / (1.0 - a * a), x0)
  per_sample = jnp.mean(w * (d - x0.astype(jnp.float32)) ** 2, axis=tuple(range(1, x0.ndim)))  # [B]
  return jnp.mean(per_sample)
