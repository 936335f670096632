"""Hand-derived reverse pass of one TTT-MLP mini-batch step: the math a backward kernel runs.

The backward of the TTT-MLP scan is, per mini-batch in reverse, the VJP of one step
(state S -> (S', out)). `jax.vjp` of `ttt_dit.ttt.inner_loop._mlp_step` does that in XLA; a kernel
has to spell it out. This file writes it out in the primal form a kernel uses (update, then apply
the new state), every line a matmul, an elementwise op or a row reduction, and is checked against
`jax.vjp` of the dual-form step (tests/pallas_kernels/test_ttt_mlp_backward_reference.py).

Per step (one head; leading batch dims `...`; C = CS rows, F features, Fh = 4F hidden):
  Z1 = K W1 + b1, X2 = gelu(Z1), Z2 = X2 W2 + b2, G2 = lnl2(Z2, V - K), G1 = (G2 W2^T) gelu'(Z1)
  W1' = W1 - K^T (e G1), b1' = b1 - e^T G1, W2' = W2 - X2^T (e G2), b2' = b2 - e^T G2
  out = Q + LN(gelu(Q W1' + b1') W2' + b2')
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ttt_dit.ttt.inner_loop import GELU_C, GELU_C3, gelu_tanh, gelu_tanh_grad

mm = lambda a, b: jnp.einsum("...ij,...jk->...ik", a, b)  # a @ b
mtm = lambda a, b: jnp.einsum("...ji,...jk->...ik", a, b)  # a^T @ b
mmt = lambda a, b: jnp.einsum("...ij,...kj->...ik", a, b)  # a @ b^T
rsum = lambda a: jnp.sum(a, axis=-2, keepdims=True)  # over rows: [..., C, N] -> [..., 1, N]
fmean = lambda a: jnp.mean(a, axis=-1, keepdims=True)  # over features: -> [..., C, 1]


def gelu_tanh_grad2(x):
  """Second derivative of the tanh-GELU with the official constants."""
  tau = jnp.tanh(GELU_C * x * (1.0 + 0.044715 * x * x))
  du = GELU_C + GELU_C3 * x * x  # d(tanh argument)/dx
  return (1.0 - tau * tau) * (du - x * tau * du * du + GELU_C3 * x * x)


def _ln_parts(z, eps):
  """xhat, std of a row LayerNorm (biased variance)."""
  mu = fmean(z)
  std = jnp.sqrt(fmean(jnp.square(z - mu)) + eps)
  return (z - mu) / std, std


def _ln_backward(xh, std, dxh):
  """d/dz given the cotangent of xhat = (z - mean) / std: [..., C, F]."""
  return (dxh - fmean(dxh) - xh * fmean(dxh * xh)) / std


def step_forward(state, x, ln_eps):
  """One step in primal form: (new state, out, saved intermediates for `step_reverse`)."""
  W1, b1, W2, b2 = state  # [...,F,Fh] [...,1,Fh] [...,Fh,F] [...,1,F]
  Q, K, V, e, gamma, beta = x  # [...,C,F] x3, [...,C], [...,1,F] x2
  e = e[..., None]  # [...,C,1]
  Z1 = mm(K, W1) + b1  # [...,C,Fh]
  X2 = gelu_tanh(Z1)
  Z2 = mm(X2, W2) + b2  # [...,C,F]
  xh, std = _ln_parts(Z2, ln_eps)
  g = gamma * (gamma * xh + beta - (V - K))
  F = Z2.shape[-1]
  G2 = (g - fmean(g) - xh * fmean(g * xh)) / std
  P = mmt(G2, W2)  # [...,C,Fh]
  G1 = P * gelu_tanh_grad(Z1)
  new = (W1 - mtm(K, e * G1), b1 - rsum(e * G1), W2 - mtm(X2, e * G2), b2 - rsum(e * G2))
  nW1, nb1, nW2, nb2 = new
  Z1b = mm(Q, nW1) + nb1
  X2b = gelu_tanh(Z1b)
  Z2b = mm(X2b, nW2) + nb2
  xhb, stdb = _ln_parts(Z2b, ln_eps)
  out = Q + gamma * xhb + beta
  del F
  saved = (Z1, X2, xh, std, g, G2, P, G1, Z1b, X2b, xhb, stdb)
  return new, out, saved


def step_reverse(state, x, saved, dnew, dout):
  """VJP of `step_forward`: (dstate, (dQ, dK, dV, de, dgamma, dbeta)).

  dnew: cotangents of the new state (dW1', db1', dW2', db2'); dout [..., C, F].
  dgamma/dbeta come back as [..., 1, F] (sum them over the leading dims).
  """
  W1, b1, W2, b2 = state
  Q, K, V, e, gamma, beta = x
  Z1, X2, xh, std, g, G2, P, G1, Z1b, X2b, xhb, stdb = saved
  e1 = e[..., None]  # [...,C,1]
  nW1 = W1 - mtm(K, e1 * G1)
  nW2 = W2 - mtm(X2, e1 * G2)
  dW1, db1, dW2, db2 = dnew
  # ---- apply: out = Q + gamma * LN(gelu(Q W1' + b1') W2' + b2') + beta
  dgamma = rsum(dout * xhb)
  dbeta = rsum(dout)
  dZ2b = _ln_backward(xhb, stdb, gamma * dout)  # [...,C,F]
  dW2 = dW2 + mtm(X2b, dZ2b)
  db2 = db2 + rsum(dZ2b)
  dZ1b = mmt(dZ2b, nW2) * gelu_tanh_grad(Z1b)  # [...,C,Fh]
  dW1 = dW1 + mtm(Q, dZ1b)
  db1 = db1 + rsum(dZ1b)
  dQ = dout + mmt(dZ1b, nW1)
  # ---- update: W1' = W1 - K^T (e G1), b1' = b1 - e^T G1, W2' = ..., b2' = ...
  KdW1 = mm(K, dW1)  # [...,C,Fh]
  X2dW2 = mm(X2, dW2)  # [...,C,F]
  dK = -mmt(e1 * G1, dW1)
  dX2 = -mmt(e1 * G2, dW2)
  dG1 = -e1 * (KdW1 + db1)
  dG2 = -e1 * (X2dW2 + db2)
  de = -jnp.sum(G1 * (KdW1 + db1), axis=-1) - jnp.sum(G2 * (X2dW2 + db2), axis=-1)  # [...,C]
  # ---- G1 = P * gelu'(Z1), P = G2 W2^T
  dP = dG1 * gelu_tanh_grad(Z1)
  dZ1 = dG1 * P * gelu_tanh_grad2(Z1)
  dG2 = dG2 + mm(dP, W2)
  dW2 = dW2 + mtm(dP, G2)
  # ---- G2 = (1/std) (I - 11^T/F - xh xh^T/F) g, g = gamma (gamma xh + beta - T), T = V - K
  u = dG2 / std
  dg = u - fmean(u) - xh * fmean(u * xh)
  dxh = -(fmean(u * xh) * g + fmean(g * xh) * u)  # the projection's dependence on xh
  dstd = -jnp.sum(dG2 * G2, axis=-1, keepdims=True) / std
  dxh = dxh + gamma * gamma * dg
  dgamma = dgamma + rsum(dg * (2.0 * gamma * xh + beta - (V - K)))
  dbeta = dbeta + rsum(dg * gamma)
  dT = -gamma * dg
  dV = dT
  dK = dK - dT
  dZ2 = _ln_backward(xh, std, dxh) + dstd * xh / xh.shape[-1]
  # ---- Z2 = X2 W2 + b2, X2 = gelu(Z1), Z1 = K W1 + b1
  dW2 = dW2 + mtm(X2, dZ2)
  db2 = db2 + rsum(dZ2)
  dX2 = dX2 + mmt(dZ2, W2)
  dZ1 = dZ1 + dX2 * gelu_tanh_grad(Z1)
  dW1 = dW1 + mtm(K, dZ1)
  db1 = db1 + rsum(dZ1)
  dK = dK + mmt(dZ1, W1)
  return (dW1, db1, dW2, db2), (dQ, dK, dV, de, dgamma, dbeta)


def group_vjp(state, xs, gamma, beta, ln_eps, dstate, dys):
  """VJP of a scan of steps over one checkpoint group, by recompute then reverse (the kernel plan).

  state: [B, H, ...] at the group start; xs = (Q, K, V, eta) leaves [G, B, H, ...]; gamma, beta
  [H, 1, F]; dstate: cotangent of the state after the group; dys [G, B, H, C, F].
  Returns (dstate at the group start, (dQ, dK, dV, deta) [G, B, H, ...], dgamma, dbeta [H, 1, F]).
  """
  def forward(carry, x):
    new, _, saved = step_forward(carry, tuple(x) + (gamma, beta), ln_eps)
    return new, (carry, saved)

  _, (states, saveds) = jax.lax.scan(forward, state, xs)  # states[m]: before step m

  def reverse(ds, inp):
    st, x, sv, dy = inp
    ds, (dq, dk, dv, de, dg, db) = step_reverse(st, tuple(x) + (gamma, beta), sv, ds, dy)
    return ds, (dq, dk, dv, de, jnp.sum(dg, axis=0), jnp.sum(db, axis=0))

  ds0, (dq, dk, dv, de, dg, db) = jax.lax.scan(reverse, dstate, (states, xs, saveds, dys),
                                               reverse=True)
  return ds0, (dq, dk, dv, de), jnp.sum(dg, axis=0), jnp.sum(db, axis=0)
