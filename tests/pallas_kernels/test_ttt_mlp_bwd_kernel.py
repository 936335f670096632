"""CPU tests of the TTT-MLP backward kernel (`kernel_bwd_mgpu`, `backward="pallas"`).

Interpret mode runs the cluster-1 kernel (whole hidden dim in one CTA); the cluster-2 kernel (DSMEM
exchange, in-place accumulation) is lowered for CUDA here and run only on the GPU
(benchmarks/ttt_mlp_kernel.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.ttt_mlp import kernel_bwd_mgpu, ttt_mlp_pallas
from kernel_testing import rel, ttt_inputs
from ttt_dit.ttt import inner_loop

NAMES = ("XQ", "XK", "XV", "eta", "ln_weight", "ln_bias", "W1", "b1", "W2", "b2")


@pytest.mark.parametrize("backward", ["pallas", "pallas_dw_gmem"])
def test_backward_kernel_gradients_batch_and_groups_interpret(backward):
  """B = 2 (state cotangents summed over the batch), NC = 3 with G = 2: two groups (the state
  cotangent carried between them), the last one short. Every gradient vs jax.grad of the float32
  XLA scan, rel L2 < 2e-2 (measured <= 5.7e-3 at NC = 3..5: bf16 matmul operands in forward and
  backward; a sign flip in the LN-L2 VJP gives 0.39)."""
  B, H, NC, G = 2, 1, 3, 2
  args = ttt_inputs(B, H, NC, 5)
  cot = jax.random.normal(jax.random.PRNGKey(11), (B, H, NC, 64, 64))
  f32 = tuple(a.astype(jnp.float32) for a in args)

  def loss(fn, a):
    return jnp.sum(fn(*a).astype(jnp.float32) * cot)

  want = jax.grad(lambda a: loss(lambda *x: inner_loop.ttt_mlp(*x, checkpoint_group_size=G),
                                 a))(f32)
  got = jax.grad(lambda a: loss(lambda *x: ttt_mlp_pallas(
      *x, checkpoint_group_size=G, interpret=True, backward=backward), a))(args)
  for name, x, y in zip(NAMES, got, want):
    assert x.shape == y.shape and x.dtype == args[NAMES.index(name)].dtype, name
    assert bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))), name
    err = rel(x, y)
    assert err < 2e-2, (name, err)


def _bwd_args(bh, g):
  S = jax.ShapeDtypeStruct
  bf, f32 = jnp.bfloat16, jnp.float32
  return ((S((bh, g + 1, 64, 64), bf),) * 3
          + (S((bh, g + 1, 64), f32), S((bh, g, 64, 64), bf), S((bh, 64), f32), S((bh, 64), f32),
             S((bh, g + 1, 4, 64, 64), bf), S((bh, g + 1, 4, 64), f32),
             S((bh, g + 1, 4, 64, 64), bf), S((bh, g + 1, 64), f32), S((bh, 4, 64, 64), f32),
             S((bh, 4, 64), f32), S((bh, 4, 64, 64), f32), S((bh, 64), f32)))


@pytest.mark.parametrize("dw_gmem", [False, True])
def test_backward_kernel_cluster2_lowers_for_cuda(dw_gmem):
  """The GPU configuration (cluster 2, 2 exchange slots, SMEM under the 227 KiB limit) lowers;
  also with dW kept in GMEM (dw_gmem)."""
  bh, g = 4, 16
  fn = kernel_bwd_mgpu.build_backward(
      bh, g, 1e-6, config=kernel_bwd_mgpu.BwdTuningConfig(cluster=2, dw_gmem=dw_gmem))
  args = _bwd_args(bh, g)
  lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text().lower()
  outs = jax.eval_shape(fn, *args)
  assert outs[0].shape == (bh, 2, g, 64, 64) and outs[6].shape == (bh, 4, 64, 64)


def test_backward_kernel_rejects_odd_group():
  """The kernel walks steps in pairs; `ttt_mlp_pallas` rounds an odd checkpoint group up."""
  with pytest.raises(ValueError, match="even"):
    kernel_bwd_mgpu.build_backward(2, 3, 1e-6)
