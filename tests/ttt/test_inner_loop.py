"""Dual-form TTT scans vs the grad-based references, gradients, remat groups, dtypes, bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from ttt_dit.ttt import inner_loop as il


def make_inputs(seed, kind, B=2, H=3, NC=4, CS=5, F=8, dtype=np.float64, eta_scale=0.2):
  """Random inputs with L2-normalised-ish scale; eta positive."""
  r = np.random.default_rng(seed)
  n = lambda *s, scale=1.0: jnp.asarray(scale * r.normal(size=s), dtype)
  Fh = 4 * F if kind == "mlp" else F
  args = [n(B, H, NC, CS, F), n(B, H, NC, CS, F), n(B, H, NC, CS, F),
          jnp.asarray(eta_scale * r.uniform(0.2, 1.0, size=(B, H, NC, CS)), dtype),
          1.0 + n(H, F, scale=0.1), n(H, F, scale=0.1),
          n(H, F, Fh, scale=0.3), n(H, 1, Fh, scale=0.1)]
  if kind == "mlp":
    args += [n(H, Fh, F, scale=0.3), n(H, 1, F, scale=0.1)]
  return args


FNS = {"mlp": (il.ttt_mlp, il.ttt_mlp_reference), "linear": (il.ttt_linear, il.ttt_linear_reference)}


def rel_err(a, b):
  return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


@pytest.mark.parametrize("kind", ["mlp", "linear"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ln_eps", [1e-6, 1e-8])
def test_dual_form_matches_grad_reference_float64(x64, kind, seed, ln_eps):
  fast, ref = FNS[kind]
  args = make_inputs(seed, kind, B=2, H=3, NC=4, CS=5, F=8)
  out = fast(*args, checkpoint_group_size=3, ln_eps=ln_eps)
  want = ref(*args, ln_eps=ln_eps)
  assert out.dtype == jnp.float64 and out.shape == (2, 3, 4, 5, 8)
  assert rel_err(out, want) < 1e-10


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_gradients_match_reference_and_finite_differences(x64, kind):
  fast, ref = FNS[kind]
  args = make_inputs(3, kind, B=1, H=2, NC=3, CS=4, F=8)
  cot = jnp.asarray(np.random.default_rng(9).normal(size=args[0].shape))
  loss = lambda f: (lambda *a: jnp.sum(f(*a) * cot))
  argnums = tuple(range(len(args)))
  g_fast = jax.grad(loss(functools.partial(fast, checkpoint_group_size=2)), argnums)(*args)
  g_ref = jax.grad(loss(ref), argnums)(*args)
  for i, (a, b) in enumerate(zip(g_fast, g_ref)):
    assert rel_err(a, b) < 1e-9, f"gradient of argument {i}"
    assert float(jnp.linalg.norm(b)) > 0, f"gradient of argument {i} is zero"
  # Finite differences on the fast path itself (all arguments at once, random directions).
  check_grads(functools.partial(fast, checkpoint_group_size=2), args, order=1, modes=["rev"],
              atol=1e-5, rtol=1e-5, eps=1e-6)


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_checkpoint_group_size_does_not_change_outputs_or_gradients(kind):
  fast, _ = FNS[kind]
  NC = 5
  args = make_inputs(4, kind, B=2, H=2, NC=NC, CS=4, F=8, dtype=np.float32)
  cot = jnp.asarray(np.random.default_rng(1).normal(size=args[0].shape), jnp.float32)

  def run(g):
    f = jax.jit(lambda *a: fast(*a, checkpoint_group_size=g))
    out = f(*args)
    grads = jax.grad(lambda *a: jnp.sum(f(*a) * cot), tuple(range(len(args))))(*args)
    return out, grads

  out1, g1 = run(1)
  for g in (2, 3, NC, 100):
    out, grads = run(g)
    np.testing.assert_allclose(out, out1, rtol=1e-6, atol=1e-6, err_msg=f"group {g}")
    for i, (a, b) in enumerate(zip(grads, g1)):
      # float32 reordering errors scale with the gradient's magnitude, not with each element's
      # (eta's gradient reaches ~100 with elements ~0.1: 5e-6 apart on one CPU, not on another)
      scale = float(np.abs(np.asarray(b)).max())
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6 * max(1.0, scale),
                                 err_msg=f"group {g}, argument {i}")


def test_bf16_inputs_stay_close_to_float32():
  args = make_inputs(5, "mlp", B=1, H=2, NC=6, CS=8, F=16, dtype=np.float32, eta_scale=0.05)
  out32 = il.ttt_mlp(*args)
  bf = [a.astype(jnp.bfloat16) if i < 3 else a for i, a in enumerate(args)]
  out16 = il.ttt_mlp(*bf)
  assert out16.dtype == jnp.bfloat16
  assert rel_err(out16.astype(jnp.float32), out32) < 2e-2  # bf16 has 8 mantissa bits


def test_state_is_float32_for_bf16_state():
  args = make_inputs(6, "mlp", B=1, H=1, NC=2, CS=4, F=8, dtype=np.float32)
  state_bf16 = [a.astype(jnp.bfloat16) for a in args[6:]]
  out, final = il.ttt_mlp_with_state(*args[:6], *state_bf16)
  assert all(s.dtype == jnp.float32 for s in final)
  assert out.dtype == jnp.float32


def test_zero_eta_minibatch_keeps_state_and_outputs_q_plus_ln_fq(x64):
  args = make_inputs(7, "mlp", B=1, H=2, NC=3, CS=4, F=8)
  XQ, XK, XV, eta, lw, lb, W1, b1, W2, b2 = args
  eta = eta.at[:, :, 0].set(0.0)  # first mini-batch does nothing
  out, _ = il.ttt_mlp_with_state(XQ, XK, XV, eta, lw, lb, W1, b1, W2, b2, ln_eps=1e-6)
  f_q = il.gelu_tanh(XQ[:, :, 0] @ W1 + b1) @ W2 + b2  # [B,H,CS,F] with the initial state
  want = XQ[:, :, 0] + il.layer_norm(f_q, lw[:, None], lb[:, None], 1e-6)
  assert rel_err(out[:, :, 0], want) < 1e-12
  # All-zero eta: the final state is the initial one.
  _, final = il.ttt_mlp_with_state(XQ, XK, XV, jnp.zeros_like(eta), lw, lb, W1, b1, W2, b2)
  for s, s0 in zip(final, (W1, b1, W2, b2)):
    np.testing.assert_array_equal(s[0], s0)


def test_gelu_derivative_matches_autodiff(x64):
  x = jnp.linspace(-6, 6, 101)
  np.testing.assert_allclose(il.gelu_tanh_grad(x), jax.vmap(jax.grad(il.gelu_tanh))(x),
                             rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_diagnostics_do_not_change_outputs_and_report_a_decreasing_loss(kind):
  fast, _ = FNS[kind]
  args = make_inputs(8, kind, B=1, H=2, NC=4, CS=8, F=8, dtype=np.float32, eta_scale=0.02)
  out, diag = fast(*args, diagnostics=True)
  np.testing.assert_allclose(out, fast(*args), rtol=1e-6, atol=1e-6)
  assert diag.loss_before.shape == diag.loss_after.shape == diag.update_norm.shape == (1, 2, 4)
  # One small gradient step lowers the loss on the mini-batch it was taken on.
  assert bool(jnp.all(diag.loss_after < diag.loss_before))
  assert bool(jnp.all(diag.update_norm > 0))


def test_bad_inputs_raise_clear_errors():
  args = make_inputs(0, "mlp", B=1, H=2, NC=2, CS=4, F=8, dtype=np.float32)
  XQ, XK, XV, eta, lw, lb, W1, b1, W2, b2 = args
  with pytest.raises(ValueError, match=r"W1 has shape \(2, 6, 32\)"):
    il.ttt_mlp(XQ, XK, XV, eta, lw, lb, W1[:, :6], b1, W2, b2)
  with pytest.raises(ValueError, match=r"eta has shape \(1, 2, 2, 4, 4\)"):
    il.ttt_mlp(XQ, XK, XV, jnp.broadcast_to(eta[..., None], eta.shape + (4,)), lw, lb, W1, b1, W2, b2)
  with pytest.raises(ValueError, match=r"XK has shape"):
    il.ttt_mlp(XQ, XK[..., :4], XV, eta, lw, lb, W1, b1, W2, b2)
  with pytest.raises(ValueError, match=r"ln_weight has shape"):
    il.ttt_linear(XQ, XK, XV, eta, lw[:, :4], lb, W1[..., :8], b1[..., :8])
  with pytest.raises(ValueError, match=r"eta has 1 non-finite values .* index \(0, 1, 1, 2\)"):
    il.ttt_mlp(XQ, XK, XV, eta.at[0, 1, 1, 2].set(jnp.nan), lw, lb, W1, b1, W2, b2)
  with pytest.raises(ValueError, match=r"XQ must be \[B, H, NC, CS, F\]"):
    il.ttt_mlp(XQ[0], XK, XV, eta, lw, lb, W1, b1, W2, b2)
