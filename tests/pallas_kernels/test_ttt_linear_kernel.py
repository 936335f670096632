"""CPU tests of the TTT-Linear Mosaic GPU kernels (forward, backward): interpret mode vs the XLA
scan / jax.grad, CUDA lowering, fallback.

Interpret mode cannot run the in-place accumulation into the carried state (no rule for wgmma under
`run_state`: a fresh accumulator is added there instead); that and the real shapes/timings are
covered by benchmarks/ttt_linear_kernel.py on the GPU.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.ttt_linear import kernel_supported, ttt_linear_pallas
from pallas_kernels.ttt_linear import kernel_bwd_mgpu, kernel_mgpu
from pallas_kernels.ttt_linear import ttt_linear as ttt_linear_mod
from kernel_testing import rel, ttt_inputs
from ttt_dit.ttt import inner_loop

NAMES = ("XQ", "XK", "XV", "eta", "ln_weight", "ln_bias", "W1", "b1")


def _inputs(B, H, NC, seed):
  """TTT-Linear inputs with large steps (eta ~ 0.05): the state really moves."""
  return ttt_inputs(B, H, NC, seed, hidden=None, w_scale=0.1)


def _f32(args):
  return tuple(a.astype(jnp.float32) for a in args)


_step = jax.jit(functools.partial(inner_loop._linear_step, ln_eps=1e-6, diagnostics=False))


def _xla_steps(f):
  """The XLA scan's step (`inner_loop._linear_step`, float32) one mini-batch at a time (one
  compile for every call): (outputs [B, H, NC, CS, F], the state before each mini-batch)."""
  XQ, XK, XV, eta, lw, lb, W1, b1 = f
  B = XQ.shape[0]
  state = tuple(jnp.broadcast_to(s, (B,) + s.shape) for s in (W1, b1))
  outs, states = [], []
  for m in range(XQ.shape[2]):
    states.append(state)
    state, o = _step(state, (XQ[:, :, m], XK[:, :, m], XV[:, :, m], eta[:, :, m],
                             lw[:, None, :], lb[:, None, :]))
    outs.append(o)
  return jnp.stack(outs, axis=2), states


@pytest.mark.parametrize("variant", ["primal", "dual"])
def test_forward_and_checkpoints_match_xla_scan_interpret(variant):
  """B=1, H=2, NC=5, G=2 (last group short). Outputs (rel L2 of out - Q, measured ~2e-3: bf16
  matmul operands) < 1e-2 and every checkpoint (W1, b1) vs the XLA scan's state < 1e-2; with the
  state frozen (eta = 0) the outputs are far off, so the update is really checked."""
  B, H, NC, G = 1, 2, 5, 2
  args = _inputs(B, H, NC, 0)
  f = _f32(args)
  ref, states = _xla_steps(f)
  out, (ck_w1, ck_b1) = jax.jit(lambda *a: ttt_linear_mod._forward(
      *a, group=G, ln_eps=1e-6, interpret=True, variant=variant))(*args)
  assert out.shape == ref.shape and out.dtype == jnp.bfloat16
  err = rel(out.astype(jnp.float32) - f[0], ref - f[0])
  assert err < 1e-2, err
  frozen, _ = _xla_steps(f[:3] + (jnp.zeros_like(f[3]),) + f[4:])
  assert rel(frozen - f[0], ref - f[0]) > 10 * err
  assert ck_w1.shape == (3, B, H, 64, 64) and ck_b1.shape == (3, B, H, 1, 64)
  for g in range(3):
    want = states[g * G]
    assert rel(ck_w1[g], want[0]) < 1e-2, (g, rel(ck_w1[g], want[0]))
    assert rel(ck_b1[g], want[1]) < 1e-2, (g, rel(ck_b1[g], want[1]))


@pytest.mark.parametrize("variant,own,other", [("primal", "all", "split_z"),
                                               ("dual_prefetch_split", "split_z", "all")])
def test_checkpoints_follow_their_rounding_emulation_interpret(variant, own, other):
  """B=1, H=2, NC=4, G=1: each step's state update (checkpoint m minus checkpoint 0) matches
  `benchmarks.ttt_linear_rounding`'s emulation of the kernel's own rounding (measured <= 2.6e-6:
  bf16 W1 in K W1, or with split_state W1's (hi, lo) pair) and not the other's (1.2e-3 apart):
  split_state really adds W1's lo half, and the emulation behind NOTES-ttt-linear.md is the kernel's."""
  from benchmarks import ttt_linear_rounding
  NC = 4
  args = _inputs(1, 2, NC, 0)
  XQ, XK, XV, eta, lw, lb, W1, b1 = _f32(args)
  _, (ck_w1, _) = jax.jit(lambda *a: ttt_linear_mod._forward(
      *a, group=1, ln_eps=1e-6, interpret=True, variant=variant))(*args)
  emu = {m: ttt_linear_rounding.trajectory((W1[None], b1[None]), (XK, XV, eta, lw, lb), m, 1e-6)[0]
         for m in (own, other)}
  for m in range(1, NC):
    moved = ck_w1[m] - ck_w1[0]
    assert rel(moved, emu[own][m] - emu[own][0]) < 1e-4, (m, own)
    assert rel(moved, emu[other][m] - emu[other][0]) > 5e-4, (m, other)


_GRAD_G = 2


@functools.lru_cache(maxsize=1)
def _grad_case():
  """(inputs, output cotangent, jax.grad of the float32 XLA scan): B=2, H=1, NC=3."""
  args = _inputs(2, 1, 3, 5)
  cot = jax.random.normal(jax.random.PRNGKey(11), (2, 1, 3, 64, 64))
  loss = lambda a: jnp.sum(inner_loop.ttt_linear(*a, checkpoint_group_size=_GRAD_G) * cot)
  return args, cot, jax.jit(jax.grad(loss))(_f32(args))


@pytest.mark.parametrize("backward", ["xla_vjp", "pallas"])
def test_gradients_match_jax_grad_interpret(backward):
  """B=2 (state cotangents summed over the batch), H=1, NC=3, G=2 (two groups, the last short):
  every gradient of the custom_vjp (kernel forward; backward = XLA-scan VJP from the kernel's
  checkpoints, or the forward kernel restarted per group + the backward kernel) vs jax.grad of
  the float32 XLA scan: rel L2 < 2e-2 (measured 1.5e-3 to 3.5e-3: bf16 matmul operands), finite,
  in the inputs' dtypes."""
  args, cot, want = _grad_case()
  loss = lambda a: jnp.sum(ttt_linear_pallas(*a, checkpoint_group_size=_GRAD_G, interpret=True,
                                             backward=backward).astype(jnp.float32) * cot)
  got = jax.jit(jax.grad(loss))(args)
  for name, x, y, a in zip(NAMES, got, want, args):
    assert x.shape == y.shape and x.dtype == a.dtype, name
    assert bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))), name
    err = rel(x, y)
    assert err < 2e-2, (name, err)


@pytest.mark.parametrize("variant", ["primal", "dual_prefetch", "primal_prefetch_split",
                                     "primal_prefetch_split_wide"])
def test_kernel_lowers_for_cuda(variant):
  """The compiled kernel (state accumulated in place) lowers to a Mosaic GPU module for CUDA."""
  bh, nc, g = 4, 40, 16
  fn = kernel_mgpu.build_forward(bh, nc, g, 1e-6, config=ttt_linear_mod.VARIANTS[variant])
  S = jax.ShapeDtypeStruct
  bf, f32 = jnp.bfloat16, jnp.float32
  args = (S((bh, nc, 64, 64), bf),) * 3 + (S((bh, nc, 64), f32), S((bh, 64), f32),
                                            S((bh, 64), f32), S((bh, 64, 64), f32),
                                            S((bh, 64), f32))
  lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text().lower()
  outs = jax.eval_shape(fn, *args)
  assert [o.shape for o in outs] == [(bh, nc, 64, 64), (bh, 3, 64, 64), (bh, 3, 64)]


@pytest.mark.parametrize("backward", ["pallas", "pallas_wide"])
def test_backward_kernel_lowers_for_cuda(backward):
  """The compiled backward kernel (dW accumulated in place) lowers for CUDA."""
  bh, g = 4, 16
  fn = kernel_bwd_mgpu.build_backward(bh, g, 1e-6,
                                      config=ttt_linear_mod._BWD_CONFIGS[backward])  # noqa: SLF001
  S = jax.ShapeDtypeStruct
  bf, f32 = jnp.bfloat16, jnp.float32
  args = ((S((bh, g + 1, 64, 64), bf),) * 3
          + (S((bh, g + 1, 64), f32), S((bh, g, 64, 64), bf), S((bh, 64), f32), S((bh, 64), f32),
             S((bh, g + 1, 64, 64), f32), S((bh, g + 1, 64), f32), S((bh, 64, 64), f32),
             S((bh, 64), f32)))
  lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text().lower()
  outs = jax.eval_shape(fn, *args)
  assert [o.shape for o in outs[:4]] == [(bh, g, 64, 64)] * 3 + [(bh, g, 64)]


def test_unsupported_falls_back_to_xla(caplog):
  """F = 32 (and, here, a CPU device) is not a kernel case: one log line, the XLA scan's numbers
  exactly, also through `inner_loop.ttt_linear(implementation="pallas")`."""
  ks = jax.random.split(jax.random.PRNGKey(3), 5)
  f, cs, nc = 32, 8, 3
  x = lambda k: jax.random.normal(k, (1, 2, nc, cs, f))
  args = (x(ks[0]), x(ks[1]), x(ks[2]), 0.01 * jnp.ones((1, 2, nc, cs)), jnp.ones((2, f)),
          jnp.zeros((2, f)), 0.05 * jax.random.normal(ks[3], (2, f, f)),
          0.05 * jax.random.normal(ks[4], (2, 1, f)))
  assert kernel_supported(args[0]) is not None
  ref = inner_loop.ttt_linear(*args, checkpoint_group_size=2)
  with caplog.at_level(logging.INFO):
    out = ttt_linear_pallas(*args, checkpoint_group_size=2)
  assert sum("ttt_linear_pallas: falling back" in r.getMessage() for r in caplog.records) == 1
  assert jnp.array_equal(out, ref)
  out2 = inner_loop.ttt_linear(*args, checkpoint_group_size=2, implementation="pallas")
  assert jnp.array_equal(out2, ref)
  with pytest.raises(ValueError, match="implementation"):
    inner_loop.ttt_linear(*args, implementation="cuda")
