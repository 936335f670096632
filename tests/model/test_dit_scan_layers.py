"""`scan_layers`: the layers as one lax.scan over stacked parameters compute what the Python loop does."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_dit.model import configs
from ttt_dit.model.dit import DiT


def _inputs(c, scenes):
  T = configs.num_latent_frames(scenes, c.attn_length, c.prefix_temporal_length)
  Lt = configs.text_len_for(scenes, T, c.latent_height * c.latent_width, c.mini_batch_size, c.max_text_len)
  k1, k2 = jax.random.split(jax.random.key(1))
  return (jax.random.normal(k1, (1, T, 4, 6, 16)), jax.random.normal(k2, (1, scenes, Lt, c.text_dim)),
          jnp.array([321]))


def _models(sequence_layer, remat):
  c = configs.get_config("tiny", sequence_layer, "9s")
  c.dtype = c.param_dtype = "float32"
  cs = c.copy_and_resolve_references()
  cs.scan_layers = True
  cs.remat_layer_group_size = 1 if remat else 0
  return DiT(c, rngs=nnx.Rngs(0)), DiT(cs, rngs=nnx.Rngs(0)), c


@pytest.mark.parametrize("sequence_layer,remat", [("ttt_mlp", False), ("ttt_linear", True)])
def test_scan_layers_equals_loop(sequence_layer, remat):
  """Same loss and parameter gradients as the unrolled loop (gates at their 0.1 init: TTT contributes)."""
  m, ms, c = _models(sequence_layer, remat)
  assert c.num_layers >= 2
  lat, txt, t = _inputs(c, 3)
  loss = lambda mm: jnp.mean(mm(lat, txt, t) ** 2)
  (l0, g0) = nnx.jit(lambda mm: nnx.value_and_grad(loss)(mm))(m)
  (l1, g1) = nnx.jit(lambda mm: nnx.value_and_grad(loss)(mm))(ms)
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  g0, g1 = jax.tree.leaves(nnx.state(g0)), jax.tree.leaves(nnx.state(g1))
  assert len(g0) == len(g1) and any(float(jnp.max(jnp.abs(a))) > 0 for a in g0)
  for a, b in zip(g0, g1):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7)


def test_scan_layers_refuses_diagnostics_and_group_remat():
  """Diagnostics sown inside the scan and remat groups > 1 are refused with a message naming the cause."""
  _, ms, c = _models("ttt_mlp", False)
  for _, mod in nnx.iter_graph(ms):
    if hasattr(mod, "collect_diagnostics"):
      mod.collect_diagnostics = True
  lat, txt, t = _inputs(c, 3)
  with pytest.raises(ValueError, match="collects diagnostics"):
    ms(lat, txt, t)
  bad = c.copy_and_resolve_references()
  bad.scan_layers, bad.remat_layer_group_size = True, 2
  with pytest.raises(ValueError, match="remat_layer_group_size must be 0 or 1"):
    configs.validate_config(bad)
