"""`scan_layers`: the layers as one lax.scan over stacked parameters compute what the Python loop does."""

from __future__ import annotations

import pytest
from flax import nnx

from dit_testing import assert_same_loss_and_grads, tiny_inputs
from ttt_dit.model import configs
from ttt_dit.model.dit import DiT


def _models(sequence_layer, remat_group):
  c = configs.get_config("tiny", sequence_layer, "3s")
  c.dtype = c.param_dtype = "float32"
  c.num_layers = 2 * max(remat_group, 1)  # two scan steps
  cs = c.copy_and_resolve_references()
  cs.scan_layers = True
  cs.remat_layer_group_size = remat_group
  return DiT(c, rngs=nnx.Rngs(0)), DiT(cs, rngs=nnx.Rngs(0)), c


@pytest.mark.parametrize("sequence_layer,remat_group", [("ttt_mlp", 0), ("ttt_linear", 2)])
def test_scan_layers_equals_loop(sequence_layer, remat_group):
  """Same loss and parameter gradients as the unrolled loop (gates at their 0.1 init: TTT contributes)."""
  m, ms, c = _models(sequence_layer, remat_group)
  assert c.num_layers >= 2
  assert_same_loss_and_grads(m, ms, tiny_inputs(c, 1, seed=1, t=321))


def test_scan_layers_refuses_diagnostics():
  """Diagnostics sown inside the scan are refused with a message naming the cause."""
  _, ms, c = _models("ttt_mlp", 0)
  for _, mod in nnx.iter_graph(ms):
    if hasattr(mod, "collect_diagnostics"):
      mod.collect_diagnostics = True
  lat, txt, t = tiny_inputs(c, 1)
  with pytest.raises(ValueError, match="collects diagnostics"):
    ms(lat, txt, t)
