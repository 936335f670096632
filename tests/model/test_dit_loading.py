"""save_dit / load_dit / load_dit_model round trips and strict loading errors."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ttt_dit
from dit_testing import tiny_inputs
from converters import common
from ttt_dit.model import configs, loading
from ttt_dit.model.dit import DiT


def test_save_load_round_trip(tmp_path):
  c = configs.get_config("tiny", "ttt_linear", "3s")
  model = DiT(c, rngs=nnx.Rngs(0))
  loading.save_dit(str(tmp_path / "ckpt"), model, c)
  assert os.path.isfile(tmp_path / "ckpt" / "transformer" / loading.CONFIG_FILE)
  lat, txt, t = tiny_inputs(c, 1)
  ref = nnx.jit(lambda m, *a: m(*a))(model, lat, txt, t)
  dit = ttt_dit.load_dit(str(tmp_path / "ckpt"), dtype=jnp.float32)
  np.testing.assert_allclose(np.asarray(dit(lat, txt, t)), np.asarray(ref), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(dit(lat, txt[:, 0], t)), np.asarray(dit(lat, txt, t)))  # 3-D text
  dit16 = ttt_dit.load_dit(str(tmp_path / "ckpt"))  # default bf16
  y16 = dit16(lat, txt, t)
  assert y16.dtype == jnp.bfloat16
  assert float(jnp.linalg.norm(y16.astype(jnp.float32) - ref) / jnp.linalg.norm(ref)) < 3e-2
  m2, c2 = loading.load_dit_model(str(tmp_path / "ckpt" / "transformer"))
  assert c2.sequence_layer == "ttt_linear" and c2.to_dict() == c.to_dict()
  np.testing.assert_array_equal(np.asarray(m2.layers[1].seq_modeling_block.ssm.ttt.W1[...]),
                                np.asarray(model.layers[1].seq_modeling_block.ssm.ttt.W1[...]))


def test_load_refuses_mismatched_checkpoint(tmp_path):
  c = configs.get_config("tiny", "none", "3s")
  model = DiT(c, rngs=nnx.Rngs(0))
  loading.save_dit(str(tmp_path / "good"), model, c)
  flat = loading.load_orbax_flat(str(tmp_path / "good"))
  flat["layers.0.mlp.layer9.kernel"] = flat.pop("layers.0.mlp.layer1.kernel")
  del flat["final_layer.norm.bias"]
  flat["transformer_norm.scale"] = np.ones((65,), np.float32)
  bad = tmp_path / "bad" / "transformer"
  common.save_orbax(str(bad), common.unflatten(flat))
  common.write_json(str(bad / loading.CONFIG_FILE), c.to_dict())
  with pytest.raises(ValueError) as e:
    loading.load_dit_model(str(tmp_path / "bad"))
  msg = str(e.value)
  for needle in ("layers.0.mlp.layer9.kernel", "layers.0.mlp.layer1.kernel", "final_layer.norm.bias",
                 "transformer_norm.scale -> transformer_norm.scale: expected (64,), got (65,)"):
    assert needle in msg, msg
  with pytest.raises(ValueError, match="not a converted DiT checkpoint"):
    loading.load_dit_model(str(tmp_path))
