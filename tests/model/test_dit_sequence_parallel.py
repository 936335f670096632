"""The MLP input is constrained to a sequence split over the configured mesh axis (spec §8.1)."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from ttt_dit.model import configs
from ttt_dit.model.dit import DiT


def _constraints(tensor: int, axis: str = "tensor", with_mesh: bool = True) -> list:
  """Sharding-constraint equations in the traced forward of a 1-layer tiny DiT."""
  c = configs.get_config("tiny", "ttt_mlp", "3s")
  c.num_layers, c.sequence_parallel_axis = 1, axis
  model = DiT(c, rngs=nnx.Rngs(0))
  lat = jnp.zeros((2, c.num_frames, 2 * c.latent_height, 2 * c.latent_width, c.in_channels))
  text = jnp.zeros((2, c.num_scenes, c.text_len, c.text_dim))
  t = jnp.zeros((2,), jnp.int32)
  trace = lambda: jax.make_jaxpr(lambda a, b, tt: model(a, b, tt))(lat, text, t)
  if with_mesh:
    mesh = AbstractMesh((1, 2, tensor), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    with jax.sharding.use_abstract_mesh(mesh):
      jaxpr = trace()
  else:
    jaxpr = trace()
  return [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "sharding_constraint"]


def test_mlp_input_is_split_along_the_sequence():
  eqns = _constraints(tensor=2)
  assert len(eqns) == 1  # one layer, one MLP
  (x,) = eqns[0].invars
  B, L, D = x.aval.shape
  assert (B, D) == (2, 64) and L == 24
  spec = eqns[0].params["sharding"].spec
  assert spec[1] == "tensor" and spec[2] is None, spec


@pytest.mark.parametrize("kwargs", [dict(tensor=2, axis=""), dict(tensor=1), dict(tensor=5),
                                    dict(tensor=2, with_mesh=False)])
def test_no_constraint_without_an_axis_that_splits_the_sequence(kwargs):
  """No axis configured, an axis of size 1, a size that does not divide L = 24, or no mesh at all."""
  assert _constraints(**kwargs) == []
