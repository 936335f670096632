"""Helpers shared by the DiT tests: tiny inputs for a stage, loss-and-gradient comparison of two models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_dit.model import configs


def tiny_inputs(c, scenes: int, seed: int = 0, t: int = 500):
  """latents [1, T, 4, 6, 16], text [1, scenes, L_t, Dt], timesteps [1] for a tiny-preset config."""
  T = configs.num_latent_frames(scenes, c.attn_length, c.prefix_temporal_length)
  Lt = configs.text_len_for(scenes, T, c.latent_height * c.latent_width, c.mini_batch_size, c.max_text_len)
  k1, k2 = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(k1, (1, T, 4, 6, 16)), jax.random.normal(k2, (1, scenes, Lt, c.text_dim)),
          jnp.array([t]))


def loss_and_grad(model, lat, txt, t):
  """(mean squared output, nnx gradient state) of `model` on one batch, jitted."""
  return nnx.jit(lambda m: nnx.value_and_grad(lambda mm: jnp.mean(mm(lat, txt, t) ** 2))(m))(model)


def assert_same_loss_and_grads(reference, other, inputs, rtol: float = 1e-4, atol: float = 1e-7) -> None:
  """Both models give the same loss and parameter gradients (and the gradients are not all zero)."""
  (l0, g0), (l1, g1) = loss_and_grad(reference, *inputs), loss_and_grad(other, *inputs)
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  g0, g1 = jax.tree.leaves(nnx.state(g0)), jax.tree.leaves(nnx.state(g1))
  assert len(g0) == len(g1) and any(float(jnp.max(jnp.abs(a))) > 0 for a in g0)
  for a, b in zip(g0, g1):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=rtol, atol=atol)
