"""Remat knobs (layer groups, attention, forward/reverse TTT, MLP, sequence block) keep the math."""

from __future__ import annotations

import numpy as np
from flax import nnx

from dit_testing import assert_same_loss_and_grads, tiny_inputs
from ttt_dit.model import configs
from ttt_dit.model.dit import DiT


def test_remat_knobs_keep_outputs_and_gradients():
  """Layer-group, attention, MLP and sequence-block remat: same loss and gradients (local-attention model)."""
  c = configs.get_config("tiny", "none", "9s")
  cr = configs.get_config("tiny", "none", "9s")
  cr.remat_layer_group_size = 2
  cr.remat_attention = cr.remat_mlp = cr.remat_seq_block = True
  m, mr = DiT(c, rngs=nnx.Rngs(0)), DiT(cr, rngs=nnx.Rngs(0))
  assert_same_loss_and_grads(m, mr, tiny_inputs(c, 3))


def test_ttt_remat_knobs_keep_outputs():
  """Forward/reverse TTT remat wrappers are wired to the same TTT layer (same output; gradients are the
  inner loop's business and are tested with the TTT layer)."""
  c = configs.get_config("tiny", "ttt_linear", "9s")
  cr = configs.get_config("tiny", "ttt_linear", "9s")
  cr.remat_forward_ssm = cr.remat_reverse_ssm = True
  m, mr = DiT(c, rngs=nnx.Rngs(0)), DiT(cr, rngs=nnx.Rngs(0))
  lat, txt, t = tiny_inputs(c, 3)
  fwd = nnx.jit(lambda mm: mm(lat, txt, t))
  np.testing.assert_allclose(np.asarray(fwd(mr)), np.asarray(fwd(m)), rtol=1e-6, atol=1e-6)
