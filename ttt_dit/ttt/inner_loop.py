"""TTT-MLP / TTT-Linear inner loops: pure functions, `jax.lax.scan` over mini-batches.

Semantics are those of the official kernels (spec §3.4-§3.6): per mini-batch m with state W,
one full-batch gradient step on the (eta-weighted) LayerNorm-reconstruction loss of the keys,
then the queries of the *same* mini-batch are evaluated with the updated state (non-causal within
a mini-batch, causal across mini-batches). The outputs are computed in the "dual form" (C x C
attention-like matrices, as the official reference op does); `*_reference` functions beside them do
the same thing the slow, obvious way with `jax.grad`.

Shapes: B batch, H heads, NC mini-batches, CS mini-batch size, F head dim, 4F hidden (MLP).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
State = tuple[Array, ...]

GELU_C = 0.79788456  # the official kernels' truncated sqrt(2 / pi)
GELU_C3 = 0.1070322243  # 3 * 0.044715 * GELU_C, as in the official kernels


class TTTDiagnostics(NamedTuple):
  """Per mini-batch inner-loop diagnostics, each [B, H, NC] (float32)."""

  loss_before: Array  # mean_{j,f} (LN(f(k_j; W)) - (v_j - k_j))^2 with the incoming state W
  loss_after: Array  # the same with the updated state W'
  update_norm: Array  # || W' - W || over all state tensors (Frobenius)


# ----------------------------------------------------------------------------- elementwise math


def gelu_tanh(x: Array) -> Array:
  """tanh-approximated GELU with the official kernels' constants."""
  return 0.5 * x * (1.0 + jnp.tanh(GELU_C * x * (1.0 + 0.044715 * x * x)))


def gelu_tanh_grad(x: Array) -> Array:
  """d gelu_tanh / dx, written out as the official kernels do."""
  tau = jnp.tanh(GELU_C * x * (1.0 + 0.044715 * x * x))
  return 0.5 * (1.0 + tau) + 0.5 * x * (1.0 - tau * tau) * (GELU_C + GELU_C3 * x * x)


def layer_norm(z: Array, gamma: Array, beta: Array, eps: float) -> Array:
  """Per-head LayerNorm over the last axis (biased variance, eps inside the sqrt)."""
  mu = jnp.mean(z, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(z - mu), axis=-1, keepdims=True)
  return gamma * (z - mu) / jnp.sqrt(var + eps) + beta


def ln_l2_grad(z: Array, target: Array, gamma: Array, beta: Array, eps: float) -> Array:
  """d/dz of 1/2 ||LN(z) - target||^2 per row: the fused LayerNorm + L2 backward (spec §3.4 (4)-(6)).

  z, target: [..., CS, F]; gamma, beta broadcastable to it. Returns [..., CS, F].
  """
  f = z.shape[-1]
  mu = jnp.mean(z, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(z - mu), axis=-1, keepdims=True)
  std = jnp.sqrt(var + eps)
  x_hat = (z - mu) / std
  g = gamma * (gamma * x_hat + beta - target)  # d loss / d x_hat
  return (f * g - jnp.sum(g, axis=-1, keepdims=True)
          - x_hat * jnp.sum(g * x_hat, axis=-1, keepdims=True)) / (f * std)


def _recon_loss(z: Array, target: Array, gamma: Array, beta: Array, eps: float) -> Array:
  """Mean squared reconstruction error per (B, H): [B, H, CS, F] -> [B, H]."""
  return jnp.mean(jnp.square(layer_norm(z, gamma, beta, eps) - target), axis=(-2, -1))


# ----------------------------------------------------------------------------- input checks


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_inputs(name: str, XQ, XK, XV, eta, ln_weight, ln_bias, state: State,
                  state_names: tuple[str, ...], state_shapes: tuple[tuple[int, ...], ...],
                  checkpoint_group_size: int) -> None:
  """Raises ValueError naming the offending argument, its shape and the expected one."""
  if XQ.ndim != 5:
    raise ValueError(f"{name}: XQ must be [B, H, NC, CS, F], got shape {tuple(XQ.shape)}")
  B, H, NC, CS, F = XQ.shape
  for arg_name, arr in (("XK", XK), ("XV", XV)):
    if tuple(arr.shape) != tuple(XQ.shape):
      raise ValueError(f"{name}: {arg_name} has shape {tuple(arr.shape)}, expected XQ's shape "
                       f"{tuple(XQ.shape)} [B, H, NC, CS, F]")
  if tuple(eta.shape) != (B, H, NC, CS):
    raise ValueError(f"{name}: eta has shape {tuple(eta.shape)}, expected [B, H, NC, CS] = "
                     f"{(B, H, NC, CS)} (one step size per token; the official [.., CS, CS] matrix's "
                     f"last row)")
  for arg_name, arr in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
    if tuple(arr.shape) != (H, F):
      raise ValueError(f"{name}: {arg_name} has shape {tuple(arr.shape)}, expected [H, F] = {(H, F)}")
  for arg_name, arr, want in zip(state_names, state, state_shapes):
    if tuple(arr.shape) != want:
      raise ValueError(f"{name}: {arg_name} has shape {tuple(arr.shape)}, expected {want} for inputs "
                       f"with H={H}, F={F} (XQ shape {tuple(XQ.shape)})")
  if int(checkpoint_group_size) < 1:
    raise ValueError(f"{name}: checkpoint_group_size must be >= 1, got {checkpoint_group_size}")
  if _is_concrete(eta):
    eta_np = np.asarray(jax.device_get(eta), dtype=np.float64)
    bad = ~np.isfinite(eta_np)
    if bad.any():
      first = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(f"{name}: eta has {int(bad.sum())} non-finite values (NaN/inf), first at "
                       f"index {first} = {eta_np[first]}; they would turn the whole state into NaN")


def _state_dtype(w: Array) -> jnp.dtype:
  """The inner state is float32 whatever the inputs (float64 when the state itself is float64)."""
  return jnp.promote_types(w.dtype, jnp.float32)


# ----------------------------------------------------------------------------- one mini-batch step


def _mlp_step(state: State, xs, *, ln_eps: float, diagnostics: bool):
  """One TTT-MLP mini-batch in dual form. State (W1, b1, W2, b2) is [B, H, ...]."""
  W1, b1, W2, b2 = state  # [B,H,F,4F] [B,H,1,4F] [B,H,4F,F] [B,H,1,F]
  XQ, XK, XV, eta, gamma, beta = xs  # [B,H,CS,F] x3, [B,H,CS], [H,1,F] x2 (broadcast)
  dt = W1.dtype
  XQ, XK, XV, eta = (a.astype(dt) for a in (XQ, XK, XV, eta))
  hi = jax.lax.Precision.HIGHEST
  target = XV - XK  # [B,H,CS,F]

  Z1 = jnp.einsum("bhcf,bhfk->bhck", XK, W1, precision=hi) + b1  # [B,H,CS,4F]
  X2 = gelu_tanh(Z1)
  Z2 = jnp.einsum("bhck,bhkf->bhcf", X2, W2, precision=hi) + b2  # [B,H,CS,F]
  G2 = ln_l2_grad(Z2, target, gamma, beta, ln_eps)  # [B,H,CS,F]
  G1 = jnp.einsum("bhcf,bhkf->bhck", G2, W2, precision=hi) * gelu_tanh_grad(Z1)  # [B,H,CS,4F]

  eta_row = eta[:, :, None, :]  # [B,H,1,CS]: every row of the official eta matrix
  eG1 = jnp.einsum("bhj,bhjk->bhk", eta, G1, precision=hi)[:, :, None]  # [B,H,1,4F]
  eG2 = jnp.einsum("bhj,bhjf->bhf", eta, G2, precision=hi)[:, :, None]  # [B,H,1,F]

  # Dual form: queries see the state after the full mini-batch step, via CS x CS matrices.
  A1 = jnp.einsum("bhif,bhjf->bhij", XQ, XK, precision=hi)  # [B,H,CS,CS]
  Z1_bar = (jnp.einsum("bhcf,bhfk->bhck", XQ, W1, precision=hi)
            - jnp.einsum("bhij,bhjk->bhik", eta_row * A1, G1, precision=hi) + b1 - eG1)
  X2_bar = gelu_tanh(Z1_bar)  # [B,H,CS,4F]
  A2 = jnp.einsum("bhik,bhjk->bhij", X2_bar, X2, precision=hi)  # [B,H,CS,CS]
  Z2_bar = (jnp.einsum("bhck,bhkf->bhcf", X2_bar, W2, precision=hi)
            - jnp.einsum("bhij,bhjf->bhif", eta_row * A2, G2, precision=hi) + b2 - eG2)
  out = XQ + layer_norm(Z2_bar, gamma, beta, ln_eps)  # [B,H,CS,F]

  dW1 = jnp.einsum("bhjf,bhjk->bhfk", XK * eta[..., None], G1, precision=hi)  # [B,H,F,4F]
  dW2 = jnp.einsum("bhjk,bhjf->bhkf", X2 * eta[..., None], G2, precision=hi)  # [B,H,4F,F]
  new = (W1 - dW1, b1 - eG1, W2 - dW2, b2 - eG2)
  if not diagnostics:
    return new, out
  nW1, nb1, nW2, nb2 = new
  Z2_new = jnp.einsum("bhck,bhkf->bhcf",
                      gelu_tanh(jnp.einsum("bhcf,bhfk->bhck", XK, nW1, precision=hi) + nb1),
                      nW2, precision=hi) + nb2
  diag = TTTDiagnostics(
      _recon_loss(Z2, target, gamma, beta, ln_eps).astype(jnp.float32),
      _recon_loss(Z2_new, target, gamma, beta, ln_eps).astype(jnp.float32),
      _update_norm((dW1, eG1, dW2, eG2)))
  return new, (out, diag)


def _linear_step(state: State, xs, *, ln_eps: float, diagnostics: bool):
  """One TTT-Linear mini-batch in dual form. State (W1, b1) is [B, H, ...]."""
  W1, b1 = state  # [B,H,F,F] [B,H,1,F]
  XQ, XK, XV, eta, gamma, beta = xs
  dt = W1.dtype
  XQ, XK, XV, eta = (a.astype(dt) for a in (XQ, XK, XV, eta))
  hi = jax.lax.Precision.HIGHEST
  target = XV - XK
  Z1 = jnp.einsum("bhcf,bhfg->bhcg", XK, W1, precision=hi) + b1  # [B,H,CS,F]
  G1 = ln_l2_grad(Z1, target, gamma, beta, ln_eps)
  eta_row = eta[:, :, None, :]
  eG1 = jnp.einsum("bhj,bhjf->bhf", eta, G1, precision=hi)[:, :, None]  # [B,H,1,F]
  A1 = jnp.einsum("bhif,bhjf->bhij", XQ, XK, precision=hi)  # [B,H,CS,CS]
  Z1_bar = (jnp.einsum("bhcf,bhfg->bhcg", XQ, W1, precision=hi)
            - jnp.einsum("bhij,bhjf->bhif", eta_row * A1, G1, precision=hi) + b1 - eG1)
  out = XQ + layer_norm(Z1_bar, gamma, beta, ln_eps)
  dW1 = jnp.einsum("bhjf,bhjg->bhfg", XK * eta[..., None], G1, precision=hi)
  new = (W1 - dW1, b1 - eG1)
  if not diagnostics:
    return new, out
  Z1_new = jnp.einsum("bhcf,bhfg->bhcg", XK, new[0], precision=hi) + new[1]
  diag = TTTDiagnostics(
      _recon_loss(Z1, target, gamma, beta, ln_eps).astype(jnp.float32),
      _recon_loss(Z1_new, target, gamma, beta, ln_eps).astype(jnp.float32),
      _update_norm((dW1, eG1)))
  return new, (out, diag)


def _update_norm(deltas: tuple[Array, ...]) -> Array:
  """Frobenius norm of the whole state update per (B, H): [B, H] float32."""
  sq = sum(jnp.sum(jnp.square(d), axis=(-2, -1)) for d in deltas)
  return jnp.sqrt(sq).astype(jnp.float32)


# ----------------------------------------------------------------------------- the scan


def scan_remat_groups(step: Callable, carry, xs, group_size: int):
  """`lax.scan(step, carry, xs)` where every `group_size` steps run under `jax.checkpoint`.

  A scan of scans: only the carries at group boundaries are saved for the backward pass; each
  group is recomputed from its boundary. A shorter last group (NC % group_size) is scanned
  separately, so results do not depend on `group_size`. xs leaves are [NC, ...].
  """
  n = jax.tree.leaves(xs)[0].shape[0]
  g = max(1, min(int(group_size), n))
  n_main = (n // g) * g

  @jax.checkpoint
  def group(c, xs_g):
    return jax.lax.scan(step, c, xs_g)

  ys_parts = []
  if n_main:
    xs_main = jax.tree.map(lambda a: a[:n_main].reshape((n // g, g) + a.shape[1:]), xs)
    carry, ys = jax.lax.scan(group, carry, xs_main)
    ys_parts.append(jax.tree.map(lambda a: a.reshape((n_main,) + a.shape[2:]), ys))
  if n_main < n:
    carry, ys = group(carry, jax.tree.map(lambda a: a[n_main:], xs))
    ys_parts.append(ys)
  ys = ys_parts[0] if len(ys_parts) == 1 else jax.tree.map(
      lambda *a: jnp.concatenate(a, axis=0), *ys_parts)
  return carry, ys


def _run_scan(step, XQ, XK, XV, eta, ln_weight, ln_bias, state0: State, *,
              checkpoint_group_size: int, ln_eps: float, diagnostics: bool):
  """Shared driver: tile the state over B, move NC to the front, scan, move it back."""
  B, H, NC, CS, F = XQ.shape
  dt = _state_dtype(state0[0])
  state = tuple(jnp.broadcast_to(s.astype(dt), (B,) + s.shape) for s in state0)  # [B,H,...]
  gamma = ln_weight.astype(dt)[:, None, :]  # [H,1,F]
  beta = ln_bias.astype(dt)[:, None, :]

  def step_fn(carry, xs):
    q, k, v, e = xs
    return step(carry, (q, k, v, e, gamma, beta), ln_eps=ln_eps, diagnostics=diagnostics)

  to_front = lambda a: jnp.moveaxis(a, 2, 0)  # [B,H,NC,...] -> [NC,B,H,...]
  xs = (to_front(XQ), to_front(XK), to_front(XV), to_front(eta))
  final, ys = scan_remat_groups(step_fn, state, xs, checkpoint_group_size)
  if diagnostics:
    out, diag = ys
    diag = TTTDiagnostics(*(jnp.moveaxis(d, 0, 2) for d in diag))  # [B,H,NC]
  else:
    out, diag = ys, None
  out = jnp.moveaxis(out, 0, 2).astype(XQ.dtype)  # [B,H,NC,CS,F]
  return out, final, diag


def ttt_mlp(XQ: Array, XK: Array, XV: Array, eta: Array, ln_weight: Array, ln_bias: Array,
            W1: Array, b1: Array, W2: Array, b2: Array, *, checkpoint_group_size: int = 16,
            ln_eps: float = 1e-6, diagnostics: bool = False,
            implementation: Literal["xla", "pallas"] = "xla"):
  """TTT-MLP over a whole sequence of mini-batches.

  Args:
    XQ, XK, XV: [B, H, NC, CS, F] queries, keys and reconstruction targets (XV - XK is regressed).
    eta: [B, H, NC, CS] per-token step size with everything folded in.
    ln_weight, ln_bias: [H, F] inner LayerNorm.
    W1 [H, F, 4F], b1 [H, 1, 4F], W2 [H, 4F, F], b2 [H, 1, F]: initial state (shared over B).
    checkpoint_group_size: mini-batches per `jax.checkpoint` group (memory, not math).
    ln_eps: inner LayerNorm epsilon inside the sqrt (1e-6 = official kernels).
    diagnostics: also return `TTTDiagnostics` (costs one extra forward of the keys per step).
    implementation: "xla" (this scan) or "pallas" (fused Hopper kernel, `pallas_kernels.ttt_mlp`).

  Returns:
    [B, H, NC, CS, F] in XQ's dtype, or (that, TTTDiagnostics) when `diagnostics`.
  """
  F = XQ.shape[-1] if XQ.ndim == 5 else -1
  H = XQ.shape[1] if XQ.ndim == 5 else -1
  Fh = W1.shape[-1] if W1.ndim == 3 else -1
  _check_inputs("ttt_mlp", XQ, XK, XV, eta, ln_weight, ln_bias, (W1, b1, W2, b2),
                ("W1", "b1", "W2", "b2"),
                ((H, F, Fh), (H, 1, Fh), (H, Fh, F), (H, 1, F)), checkpoint_group_size)
  if implementation == "pallas" and not diagnostics:
    from pallas_kernels.ttt_mlp import ttt_mlp_pallas  # lazy: GPU-only dependency chain
    return ttt_mlp_pallas(XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, W2, b2,
                          checkpoint_group_size=checkpoint_group_size, ln_eps=ln_eps)
  if implementation not in ("xla", "pallas"):
    raise ValueError(f"ttt_mlp: implementation must be 'xla' or 'pallas', got {implementation!r}")
  out, _, diag = _run_scan(_mlp_step, XQ, XK, XV, eta, ln_weight, ln_bias, (W1, b1, W2, b2),
                           checkpoint_group_size=checkpoint_group_size, ln_eps=ln_eps,
                           diagnostics=diagnostics)
  return (out, diag) if diagnostics else out


def ttt_linear(XQ: Array, XK: Array, XV: Array, eta: Array, ln_weight: Array, ln_bias: Array,
               W1: Array, b1: Array, *, checkpoint_group_size: int = 16, ln_eps: float = 1e-6,
               diagnostics: bool = False, implementation: Literal["xla", "pallas"] = "xla"):
  """TTT-Linear over a whole sequence of mini-batches (state W1 [H, F, F], b1 [H, 1, F]).

  Same arguments and returns as `ttt_mlp`, with f(x) = x W1 + b1 ("pallas": the fused Hopper
  kernel, `pallas_kernels.ttt_linear`; with `diagnostics` the XLA scan runs).
  """
  F = XQ.shape[-1] if XQ.ndim == 5 else -1
  H = XQ.shape[1] if XQ.ndim == 5 else -1
  _check_inputs("ttt_linear", XQ, XK, XV, eta, ln_weight, ln_bias, (W1, b1), ("W1", "b1"),
                ((H, F, F), (H, 1, F)), checkpoint_group_size)
  if implementation == "pallas" and not diagnostics:
    from pallas_kernels.ttt_linear import ttt_linear_pallas  # lazy: GPU-only dependency chain
    return ttt_linear_pallas(XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1,
                             checkpoint_group_size=checkpoint_group_size, ln_eps=ln_eps)
  if implementation not in ("xla", "pallas"):
    raise ValueError(f"ttt_linear: implementation must be 'xla' or 'pallas', got "
                     f"{implementation!r}")
  out, _, diag = _run_scan(_linear_step, XQ, XK, XV, eta, ln_weight, ln_bias, (W1, b1),
                           checkpoint_group_size=checkpoint_group_size, ln_eps=ln_eps,
                           diagnostics=diagnostics)
  return (out, diag) if diagnostics else out


def ttt_mlp_with_state(XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, W2, b2, *,
                       checkpoint_group_size: int = 16, ln_eps: float = 1e-6):
  """Like `ttt_mlp` (XLA path) but also returns the final state (W1, b1, W2, b2), each [B, H, ...]."""
  out, final, _ = _run_scan(_mlp_step, XQ, XK, XV, eta, ln_weight, ln_bias, (W1, b1, W2, b2),
                            checkpoint_group_size=checkpoint_group_size, ln_eps=ln_eps,
                            diagnostics=False)
  return out, final


# ----------------------------------------------------------------------------- references


def _mlp_apply(params: State, x: Array) -> Array:
  W1, b1, W2, b2 = params
  return gelu_tanh(x @ W1 + b1) @ W2 + b2


def _linear_apply(params: State, x: Array) -> Array:
  W1, b1 = params
  return x @ W1 + b1


def _reference(apply_fn, XQ, XK, XV, eta, ln_weight, ln_bias, state0: State, ln_eps: float):
  """Plain per-(b, h), per-mini-batch loop: W' = W - grad(l)(W); out = q + LN(f(q; W'))."""
  B, H, NC, CS, F = XQ.shape
  dt = _state_dtype(state0[0])

  def one_head(q, k, v, e, gamma, beta, state):  # q,k,v [NC,CS,F], e [NC,CS]
    def inner_loss(params, k_m, v_m, e_m):
      pred = layer_norm(apply_fn(params, k_m), gamma, beta, ln_eps)  # [CS,F]
      return jnp.sum(e_m * 0.5 * jnp.sum(jnp.square(pred - (v_m - k_m)), axis=-1))

    outs = []
    for m in range(NC):
      grads = jax.grad(inner_loss)(state, k[m], v[m], e[m])
      state = tuple(s - g for s, g in zip(state, grads))
      outs.append(q[m] + layer_norm(apply_fn(state, q[m]), gamma, beta, ln_eps))
    return jnp.stack(outs)

  cast = lambda a: a.astype(dt)
  per_head = jax.vmap(one_head, in_axes=(0, 0, 0, 0, 0, 0, 0))  # over H
  per_batch = jax.vmap(per_head, in_axes=(0, 0, 0, 0, None, None, None))  # over B
  out = per_batch(cast(XQ), cast(XK), cast(XV), cast(eta), cast(ln_weight), cast(ln_bias),
                  tuple(cast(s) for s in state0))
  return out.astype(XQ.dtype)


def ttt_mlp_reference(XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, W2, b2, *, ln_eps=1e-6):
  """Slow, obvious TTT-MLP: `jax.grad` of the inner loss, one mini-batch at a time."""
  return _reference(_mlp_apply, XQ, XK, XV, eta, ln_weight, ln_bias, (W1, b1, W2, b2), ln_eps)


def ttt_linear_reference(XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, *, ln_eps=1e-6):
  """Slow, obvious TTT-Linear: `jax.grad` of the inner loss, one mini-batch at a time."""
  return _reference(_linear_apply, XQ, XK, XV, eta, ln_weight, ln_bias, (W1, b1), ln_eps)


def ttt_mlp_flops(B: int, H: int, NC: int, CS: int = 64, F: int = 64) -> float:
  """FLOPs of the dual-form forward (matmuls only), for benchmark TFLOP/s figures."""
  Fh = 4 * F
  per = 2 * CS * (F * Fh * 2      # Z1, Z2
                  + F * Fh        # G2 W2^T
                  + CS * F + CS * Fh  # A1, A2
                  + CS * Fh + CS * F  # (eta*A) G products
                  + F * Fh + Fh * F   # Q W1, X2_bar W2
                  + F * Fh + Fh * F)  # dW1, dW2
  return float(B * H * NC * per)
