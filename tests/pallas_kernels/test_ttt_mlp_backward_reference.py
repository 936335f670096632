"""The hand-derived TTT-MLP reverse step (`backward_reference`) vs `jax.vjp` of the XLA dual-form step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ttt_mlp import backward_reference as br
from ttt_dit.ttt import inner_loop

B, H, C, F = 2, 3, 8, 4
FH = 4 * F
EPS = 1e-6


def _case(seed, eta_scale):
  ks = jax.random.split(jax.random.PRNGKey(seed), 16)
  n = lambda k, s, sc=1.0: sc * jax.random.normal(k, s, jnp.float64)
  state = (n(ks[0], (B, H, F, FH), 0.3), n(ks[1], (B, H, 1, FH), 0.1),
           n(ks[2], (B, H, FH, F), 0.3), n(ks[3], (B, H, 1, F), 0.1))
  x = (n(ks[4], (B, H, C, F)), n(ks[5], (B, H, C, F)), n(ks[6], (B, H, C, F)),
       eta_scale * jax.random.uniform(ks[7], (B, H, C), jnp.float64, 0.5, 1.5),
       1.0 + n(ks[8], (H, 1, F), 0.2), n(ks[9], (H, 1, F), 0.2))
  dnew = tuple(n(k, s.shape) for k, s in zip(ks[10:14], state))
  dout = n(ks[14], (B, H, C, F))
  return state, x, dnew, dout


@pytest.mark.parametrize("eta_scale", [0.0, 0.05, 0.5])
def test_forward_and_reverse_step_match_xla_vjp(x64, eta_scale):
  """float64, random state/inputs/cotangents: new state, out and every cotangent to ~1e-10."""
  state, x, dnew, dout = _case(0, eta_scale)
  step = lambda s, xx: inner_loop._mlp_step(s, xx, ln_eps=EPS, diagnostics=False)
  (new_ref, out_ref), vjp = jax.vjp(step, state, x)
  dstate_ref, dx_ref = vjp((dnew, dout))
  new, out, saved = br.step_forward(state, x, EPS)
  dstate, dx = br.step_reverse(state, x, saved, dnew, dout)
  dq, dk, dv, de, dgamma, dbeta = dx
  dx = (dq, dk, dv, de, jnp.sum(dgamma, axis=0), jnp.sum(dbeta, axis=0))
  for name, a, b in zip(("W1'", "b1'", "W2'", "b2'", "out"), new + (out,), new_ref + (out_ref,)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=name)
  names = ("dW1", "db1", "dW2", "db2", "dQ", "dK", "dV", "deta", "dgamma", "dbeta")
  for name, a, b in zip(names, dstate + dx, dstate_ref + dx_ref):
    assert a.shape == b.shape, (name, a.shape, b.shape)
    np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10, err_msg=name)


def test_gelu_second_derivative(x64):
  """gelu_tanh_grad2 is the derivative of inner_loop.gelu_tanh_grad."""
  z = jnp.linspace(-5.0, 5.0, 101, dtype=jnp.float64)
  want = jax.vmap(jax.grad(inner_loop.gelu_tanh_grad))(z)
  np.testing.assert_allclose(br.gelu_tanh_grad2(z), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backward", ["xla_vjp", "reference"])
def test_custom_vjp_backward_from_exact_checkpoints(backward):
  """`_bwd` fed the XLA scan's own float32 checkpoints equals jax.vjp of the scan (no kernel).

  NC = 5 with group 2: three groups, the last one short (padded with eta = 0 steps).
  """
  from pallas_kernels.ttt_mlp import ttt_mlp as T
  nc, g, h = 5, 2, 2
  ks = jax.random.split(jax.random.PRNGKey(4), 12)
  n = lambda k, s, sc=1.0: sc * jax.random.normal(k, s, jnp.float32)
  args = (n(ks[0], (1, h, nc, C, F)), n(ks[1], (1, h, nc, C, F)), n(ks[2], (1, h, nc, C, F)),
          0.05 * jax.random.uniform(ks[3], (1, h, nc, C)), 1 + n(ks[4], (h, F), 0.1),
          n(ks[5], (h, F), 0.1), n(ks[6], (h, F, FH), 0.3), n(ks[7], (h, 1, FH), 0.1),
          n(ks[8], (h, FH, F), 0.3), n(ks[9], (h, 1, F), 0.1))
  cot = n(ks[10], (1, h, nc, C, F))
  scan = lambda *a: inner_loop.ttt_mlp(*a, checkpoint_group_size=g)
  _, vjp = jax.vjp(scan, *args)
  want = vjp(cot)
  cks = [tuple(jnp.broadcast_to(s, (1,) + s.shape) for s in args[6:])]
  for m in range(g, nc, g):
    cks.append(inner_loop.ttt_mlp_with_state(*(a[:, :, :m] for a in args[:4]), *args[4:],
                                             checkpoint_group_size=g)[1])
  ckpts = tuple(jnp.stack([c[i] for c in cks]) for i in range(4))
  got = T._bwd(g, EPS, False, "v3", backward, args + (ckpts,), cot)
  names = ("XQ", "XK", "XV", "eta", "ln_w", "ln_b", "W1", "b1", "W2", "b2")
  for name, a, b in zip(names, got, want):
    assert a.shape == b.shape, name
    err = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    assert err < 1e-5, (name, err)
