"""The XLA backward shared by the TTT kernels' `custom_vjp`s: restart the dual-form scan from each
kernel checkpoint, last group first, and differentiate it with `jax.vjp` (backward="xla_vjp")."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def group_scan(step: Callable, state: tuple, xs: tuple, gamma: Array, beta: Array, ln_eps: float):
  """`step` (inner_loop._mlp_step / _linear_step) over one group: state [B, H, ...], xs leaves [G, B, H, ...]."""
  def body(carry, x):
    q, k, v, e = x
    return step(carry, (q, k, v, e, gamma, beta), ln_eps=ln_eps, diagnostics=False)
  return jax.lax.scan(body, state, xs)


def vjp_from_checkpoints(step: Callable, ckpts: tuple, inputs: tuple, dout: Array, *, group: int,
                         ln_eps: float, input_dtype=None, group_vjp: Callable | None = None) -> tuple:
  """Cotangents of (XQ, XK, XV, eta, ln_weight, ln_bias, *state0) of a checkpointed TTT scan.

  ckpts: the state at each group start, leaves [NG, B, H, ...] (float32); inputs: (XQ, XK, XV, eta,
  ln_weight, ln_bias, *state0) as given to the forward; dout [B, H, NC, CS, F]. Groups are padded
  with zero steps (eta = 0: the state does not move, zero cotangents). `input_dtype`: cast Q/K/V/eta
  to it first (None keeps their dtype; the step casts to the state's). `group_vjp(state, xs, gamma,
  beta, ln_eps, dstate, dy) -> (dstate, dxs, dgamma, dbeta)` replaces `jax.vjp` of `group_scan`.
  """
  XQ, XK, XV, eta, ln_weight, ln_bias, *state0 = inputs
  B, H, NC = XQ.shape[:3]
  NG = ckpts[0].shape[0]
  pad = NG * group - NC
  f32 = jnp.float32

  def groups(a):  # [B, H, NC, ...] -> [NG, G, B, H, ...]
    a = a.astype(input_dtype) if input_dtype is not None else a
    a = jnp.pad(a, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 3))
    a = a.reshape((B, H, NG, group) + a.shape[3:])
    return jnp.moveaxis(jnp.moveaxis(a, 2, 0), 3, 1)

  xs = tuple(groups(a) for a in (XQ, XK, XV, eta))
  dys = groups(dout)
  gamma = ln_weight.astype(f32)[:, None, :]  # [H, 1, F]
  beta = ln_bias.astype(f32)[:, None, :]

  def body(carry, inp):
    dstate, dgamma, dbeta = carry
    state_g, xs_g, dy_g = inp
    if group_vjp is not None:
      ds, dx, dg, db = group_vjp(state_g, xs_g, gamma, beta, ln_eps, dstate, dy_g)
    else:
      _, vjp = jax.vjp(lambda s, x, g, b: group_scan(step, s, x, g, b, ln_eps), state_g, xs_g, gamma, beta)
      ds, dx, dg, db = vjp((dstate, dy_g.astype(f32)))  # dx in the inputs' dtypes
    return (ds, dgamma + dg, dbeta + db), dx

  zeros_state = tuple(jnp.zeros_like(s[0]) for s in ckpts)
  (dstate0, dgamma, dbeta), dxs = jax.lax.scan(
      body, (zeros_state, jnp.zeros_like(gamma), jnp.zeros_like(beta)), (ckpts, xs, dys), reverse=True)

  def ungroup(a, like):  # [NG, G, B, H, ...] -> [B, H, NC, ...]
    a = jnp.moveaxis(jnp.moveaxis(a, 1, 3), 0, 2)
    a = a.reshape((B, H, NG * group) + a.shape[4:])[:, :, :NC]
    return a.astype(like.dtype)

  dq, dk, dv, de = (ungroup(d, x) for d, x in zip(dxs, (XQ, XK, XV, eta)))
  dstate = tuple(jnp.sum(d, axis=0).astype(w.dtype) for d, w in zip(dstate0, state0))  # sum over B
  return (dq, dk, dv, de, dgamma[:, 0].astype(ln_weight.dtype), dbeta[:, 0].astype(ln_bias.dtype)) + dstate
