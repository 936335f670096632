"""Remat knobs (layer groups, attention, forward/reverse TTT, MLP, sequence block) keep the math."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_dit.model import configs
from ttt_dit.model.dit import DiT


def _inputs(c, scenes):
  T = configs.num_latent_frames(scenes, c.attn_length, c.prefix_temporal_length)
  Lt = configs.text_len_for(scenes, T, c.latent_height * c.latent_width, c.mini_batch_size, c.max_text_len)
  k1, k2 = jax.random.split(jax.random.key(0))
  return (jax.random.normal(k1, (1, T, 4, 6, 16)), jax.random.normal(k2, (1, scenes, Lt, c.text_dim)),
          jnp.array([500]))


def _loss_and_grad(model, lat, txt, t):
  return nnx.jit(lambda m: nnx.value_and_grad(lambda mm: jnp.mean(mm(lat, txt, t) ** 2))(m))(model)


def test_remat_knobs_keep_outputs_and_gradients():
  """Layer-group, attention, MLP and sequence-block remat: same loss and gradients (local-attention model)."""
  c = configs.get_config("tiny", "none", "9s")
  cr = configs.get_config("tiny", "none", "9s")
  cr.remat_layer_group_size = 2
  cr.remat_attention = cr.remat_mlp = cr.remat_seq_block = True
  m, mr = DiT(c, rngs=nnx.Rngs(0)), DiT(cr, rngs=nnx.Rngs(0))
  lat, txt, t = _inputs(c, 3)
  (l0, g0), (l1, g1) = _loss_and_grad(m, lat, txt, t), _loss_and_grad(mr, lat, txt, t)
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  g0, g1 = jax.tree.leaves(nnx.state(g0)), jax.tree.leaves(nnx.state(g1))
  assert len(g0) == len(g1) and any(float(jnp.max(jnp.abs(a))) > 0 for a in g0)
  for a, b in zip(g0, g1):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7)


def test_ttt_remat_knobs_keep_outputs():
  """Forward/reverse TTT remat wrappers are wired to the same TTT layer (same output; gradients are the
  inner loop's business and are tested with the TTT layer)."""
  c = configs.get_config("tiny", "ttt_linear", "9s")
  cr = configs.get_config("tiny", "ttt_linear", "9s")
  cr.remat_forward_ssm = cr.remat_reverse_ssm = True
  m, mr = DiT(c, rngs=nnx.Rngs(0)), DiT(cr, rngs=nnx.Rngs(0))
  lat, txt, t = _inputs(c, 3)
  fwd = nnx.jit(lambda mm: mm(lat, txt, t))
  np.testing.assert_allclose(np.asarray(fwd(mr)), np.asarray(fwd(m)), rtol=1e-6, atol=1e-6)
