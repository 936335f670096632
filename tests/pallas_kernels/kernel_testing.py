"""Helpers of the kernel tests: TTT inputs with large steps (the state really moves), relative error."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ttt_inputs(B: int, H: int, NC: int, seed: int = 0, *, hidden: int | None = 256, w_scale: float = 0.05,
               CS: int = 64, F: int = 64) -> tuple:
  """(XQ, XK, XV, eta, ln_w, ln_b, *state): bf16 Q/K/V (L2-normalised Q/K), eta ~ U(0, 0.05).

  hidden=None: TTT-Linear state (W1 [H, F, F], b1 [H, 1, F]); else TTT-MLP (W1, b1, W2, b2).
  """
  ks = jax.random.split(jax.random.PRNGKey(seed), 10)
  n = lambda k, s: jax.random.normal(k, s, jnp.float32)
  l2 = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  XQ = l2(n(ks[0], (B, H, NC, CS, F))).astype(jnp.bfloat16)  # [B, H, NC, CS, F]
  XK = l2(n(ks[1], (B, H, NC, CS, F))).astype(jnp.bfloat16)
  XV = n(ks[2], (B, H, NC, CS, F)).astype(jnp.bfloat16)
  eta = jax.random.uniform(ks[3], (B, H, NC, CS)) * 0.05  # [B, H, NC, CS]
  ln = (1 + 0.1 * n(ks[4], (H, F)), 0.1 * n(ks[5], (H, F)))
  if hidden is None:
    return (XQ, XK, XV, eta) + ln + (w_scale * n(ks[6], (H, F, F)), w_scale * n(ks[7], (H, 1, F)))
  return (XQ, XK, XV, eta) + ln + (w_scale * n(ks[6], (H, F, hidden)), w_scale * n(ks[7], (H, 1, hidden)),
                                   w_scale * n(ks[8], (H, hidden, F)), w_scale * n(ks[9], (H, 1, F)))


def rel(a, b) -> float:
  """Relative L2 error of a against b (float32)."""
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


def races_in_forward_kernel(fn, args, variant: str = "v4") -> tuple[bool, jax.Array]:
  """Runs a raw TTT-MLP forward kernel `fn` of `variant` (built with
  `InterpretGPUParams(detect_races=True)`; the variant sets its argument layout) on float32
  `ttt_inputs` under the interpreter's race detector: (races found, outputs)."""
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ip
  from pallas_kernels.ttt_mlp import ttt_mlp as T
  ip.reset_gpu_interpret_mode_state()
  out = fn(*T.kernel_args(*args, variant))
  jax.block_until_ready(out)
  return ip.get_races().races_found, out[0]
