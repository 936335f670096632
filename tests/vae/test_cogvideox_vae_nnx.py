"""CogVideoXVAE as an NNX module: its Params are the converted tensors; split/merge, grad."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from converters.common import flatten, load_orbax
from ttt_dit.vae.cogvideox_vae import CogVideoXVAE, flat_params, load_vae


def _stored(root) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in flatten(load_orbax(str(root / "dst" / "params"))).items()}


def test_one_param_per_converted_tensor(vae_dirs):
  root, _ = vae_dirs
  stored = _stored(root)
  vae = load_vae(str(root / "dst"), dtype=jnp.float32)
  flat = nnx.to_flat_state(nnx.state(vae, nnx.Param))
  got = {".".join(str(p) for p in path): var for path, var in flat}
  assert len(flat) == len(got) == len(stored) > 100
  assert sorted(got) == sorted(stored)
  for k, var in got.items():
    assert isinstance(var, nnx.Param), k
    assert var[...].shape == stored[k].shape and var[...].dtype == jnp.float32, k
  assert len(nnx.to_flat_state(nnx.state(vae))) == len(stored)  # no other Variables or arrays
  # The module path mirrors the diffusers name; flat_params is the inverse of the nesting.
  w = vae.decoder["up_blocks"][1]["resnets"][0]["norm1"]["conv_y"]["conv"]["weight"]
  np.testing.assert_array_equal(np.asarray(w[...]), stored["decoder.up_blocks.1.resnets.0.norm1.conv_y.conv.weight"])
  back = flat_params(vae)
  assert sorted(back) == sorted(stored)
  for k in stored:
    np.testing.assert_array_equal(np.asarray(back[k]), stored[k].astype(np.float32), err_msg=k)


def test_refuses_parameters_outside_encoder_decoder(vae_dirs):
  root, _ = vae_dirs
  stored = _stored(root)
  config = {"norm_num_groups": 4}
  with pytest.raises(ValueError, match="'encoder' and 'decoder'"):
    CogVideoXVAE({**stored, "quant_conv.weight": np.zeros(2)}, config)
  with pytest.raises(ValueError, match="decoder.conv_in.conv.weight is both"):
    CogVideoXVAE({**stored, "decoder.conv_in.conv.weight.x": np.zeros(2)}, config)


def test_split_merge_round_trip_decodes_identically(vae_dirs):
  root, _ = vae_dirs
  vae = load_vae(str(root / "dst"), dtype=jnp.float32)
  z = np.random.default_rng(5).normal(size=(1, 3, 2, 2, 4)).astype(np.float32)  # one 3-latent window
  want = np.asarray(vae.decode(z))
  graphdef, params, rest = nnx.split(vae, nnx.Param, ...)
  merged = nnx.merge(graphdef, params, rest)
  assert merged is not vae and merged.tiling == vae.tiling and merged.cfg == vae.cfg
  np.testing.assert_array_equal(np.asarray(merged.decode(z)), want)
  # decode reads the parameters from the module's state (not constants captured at load time).
  params = jax.tree.map(lambda x: x * 1.5 if x.ndim == 5 else x, params)
  changed = np.asarray(nnx.merge(graphdef, params, rest).decode(z))
  assert np.abs(changed - want).max() > 1e-3
  np.testing.assert_array_equal(np.asarray(vae.decode(z)), want)  # the original is untouched


def test_grad_of_decode_wrt_params(vae_dirs):
  root, _ = vae_dirs
  vae = load_vae(str(root / "dst"), dtype=jnp.float32)
  z = jnp.asarray(np.random.default_rng(6).normal(size=(1, 1, 2, 2, 4)), jnp.float32)  # one window

  def loss(model):
    return jnp.mean(model.decode(z) ** 2)

  grads = nnx.grad(loss)(vae)
  flat = {".".join(str(p) for p in path): np.asarray(v[...]) for path, v in nnx.to_flat_state(grads)}
  assert sorted(flat) == sorted(flat_params(vae))
  for k, g in flat.items():
    assert np.isfinite(g).all(), k
  for k in ("decoder.conv_in.conv.weight", "decoder.conv_out.conv.weight",
            "decoder.up_blocks.0.resnets.0.conv1.conv.weight"):
    assert np.abs(flat[k]).max() > 0, k
  assert all(np.abs(g).max() == 0 for k, g in flat.items() if k.startswith("encoder."))  # decode only
  # Directional derivative along the conv_in gradient agrees with a central difference.
  g = flat["decoder.conv_in.conv.weight"]
  graphdef, params = nnx.split(vae, nnx.Param)

  def shifted(eps):
    p = jax.tree.map(lambda x: x, params)
    p["decoder"]["conv_in"]["conv"]["weight"][...] += eps * g / np.linalg.norm(g)
    return float(loss(nnx.merge(graphdef, p)))

  eps = 1e-2
  fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
  np.testing.assert_allclose(fd, np.linalg.norm(g), rtol=2e-2)
