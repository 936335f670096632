"""`scan_layers`: the layers as one lax.scan over stacked parameters compute what the Python loop does."""

from __future__ import annotations

import pytest
from flax import nnx

from dit_testing import assert_same_loss_and_grads, tiny_inputs
from ttt_dit.model import configs
from ttt_dit.model.dit import DiT


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
  assert_same_loss_and_grads(m, ms, tiny_inputs(c, 3, seed=1, t=321))


def test_scan_layers_refuses_diagnostics_and_group_remat():
  """Diagnostics sown inside the scan and remat groups > 1 are refused with a message naming the cause."""
  _, ms, c = _models("ttt_mlp", False)
  for _, mod in nnx.iter_graph(ms):
    if hasattr(mod, "collect_diagnostics"):
      mod.collect_diagnostics = True
  lat, txt, t = tiny_inputs(c, 3)
  with pytest.raises(ValueError, match="collects diagnostics"):
    ms(lat, txt, t)
  bad = c.copy_and_resolve_references()
  bad.scan_layers, bad.remat_layer_group_size = True, 2
  with pytest.raises(ValueError, match="remat_layer_group_size must be 0 or 1"):
    configs.validate_config(bad)
