"""The Flax DiT end to end: multi-scene shapes, TTT gating (zero gates == local-attention model), bf16 compute."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_dit.model import configs
from ttt_dit.model.dit import DiT
from ttt_dit.model.partition import flat_paths, path_str


def _inputs(c, batch=1, seed=0, scenes=None):
  n = c.num_scenes if scenes is None else scenes
  T = configs.num_latent_frames(n, c.attn_length, c.prefix_temporal_length)
  Lt = configs.text_len_for(n, T, c.latent_height * c.latent_width, c.mini_batch_size, c.max_text_len)
  k1, k2 = jax.random.split(jax.random.key(seed))
  lat = jax.random.normal(k1, (batch, T, 2 * c.latent_height, 2 * c.latent_width, 16))
  txt = jax.random.normal(k2, (batch, n, Lt, c.text_dim))
  return lat, txt, jnp.arange(batch) * 331 + 17


@pytest.mark.parametrize("layer,scenes", [("none", 5), ("ttt_mlp", 5), ("ttt_linear", 3)])
def test_multiscene_shapes(layer, scenes):
  c = configs.get_config("tiny", layer, "3s")
  model = DiT(c, rngs=nnx.Rngs(0))
  lat, txt, t = _inputs(c, batch=2, scenes=scenes)
  out = nnx.jit(lambda m, *a: m(*a))(model, lat, txt, t)
  assert out.shape == lat.shape and out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out)))
  with pytest.raises(ValueError, match="do not fit"):
    model(lat[:, :-1], txt, t)  # T must be attn_length * n + prefix


def _copy_shared_params(src: DiT, dst: DiT) -> None:
  """Copies every parameter of `dst` from the same path in `src`."""
  values = flat_paths(nnx.state(src, nnx.Param))
  state = nnx.state(dst, nnx.Param)
  nnx.update(dst, jax.tree_util.tree_map_with_path(lambda p, _: values[path_str(p)], state))


def test_ttt_gates_zero_equals_plain_model_and_ttt_is_live():
  c_ttt = configs.get_config("tiny", "ttt_mlp", "9s")
  c_none = configs.get_config("tiny", "none", "9s")
  ttt, plain = DiT(c_ttt, rngs=nnx.Rngs(0)), DiT(c_none, rngs=nnx.Rngs(1))
  _copy_shared_params(ttt, plain)
  lat, txt, t = _inputs(c_ttt, batch=1)
  fwd = nnx.jit(lambda m, *a: m(*a))
  y_plain, y_ttt = fwd(plain, lat, txt, t), fwd(ttt, lat, txt, t)
  assert float(jnp.max(jnp.abs(y_ttt - y_plain))) > 1e-4  # gates at 0.1: TTT contributes
  # Changing the TTT weights changes the output (the TTT path is live)...
  w1 = ttt.layers[0].seq_modeling_block.ssm.ttt.W1
  w1[...] = w1[...] * 3.0
  y_ttt2 = fwd(ttt, lat, txt, t)
  assert float(jnp.max(jnp.abs(y_ttt2 - y_ttt))) > 1e-6
  # ...and with every gate at zero the TTT model is exactly the plain local-attention model.
  for layer in ttt.layers:
    b = layer.seq_modeling_block
    for gate in (b.forward_ssm_gating_text, b.forward_ssm_gating_video, b.backward_ssm_gating_text,
                 b.backward_ssm_gating_video):
      gate.gating_alpha[...] = jnp.zeros_like(gate.gating_alpha[...])
  np.testing.assert_allclose(np.asarray(fwd(ttt, lat, txt, t)), np.asarray(y_plain), rtol=0, atol=1e-6)


def test_bf16_compute_with_float32_params():
  c = configs.get_config("tiny", "ttt_mlp", "3s")
  c32 = configs.get_config("tiny", "ttt_mlp", "3s")
  c.dtype = "bfloat16"
  m16, m32 = DiT(c, rngs=nnx.Rngs(0)), DiT(c32, rngs=nnx.Rngs(0))
  assert all(x.dtype == jnp.float32 for x in flat_paths(nnx.state(m16, nnx.Param)).values())
  lat, txt, t = _inputs(c, batch=1)
  fwd = nnx.jit(lambda m, *a: m(*a))
  y16, y32 = fwd(m16, lat, txt, t), fwd(m32, lat, txt, t)
  assert y16.dtype == jnp.bfloat16
  err = float(jnp.linalg.norm(y16.astype(jnp.float32) - y32) / jnp.linalg.norm(y32))
  assert err < 3e-2, err
