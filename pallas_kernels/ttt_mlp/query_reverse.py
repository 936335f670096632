"""The queries' half of the TTT-MLP backward, for all mini-batches at once (XLA, no scan).

Mini-batch m's output out_m = Q_m + LN(gelu(Q_m W1' + b1') W2' + b2') reads the state after step
m (W' = W_{m+1}) but feeds nothing later in the scan. Once the backward's restarts have written
every per-step state, the reverse of the output path is therefore independent across mini-batches:
this computes it for a whole launch of steps as batched matmuls, off the backward kernel's
step-by-step chain (`backward="pallas_qpass"`). What the chain still needs from it, per step, is
what the output path adds to the state cotangent dW_{m+1}:
  dW2 += X2b^T dZ2b, dW1 += Q^T dZ1b, db2 += 1^T dZ2b, db1 += 1^T dZ1b,
which the kernel adds by wgmma from the bf16 tiles returned here (X2b, dZ2b, dZ1b, as its own
query phase rounded them), plus the two bias vectors.

Matmul operands are bf16 with float32 accumulation (as the kernels), everything else float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ttt_dit.ttt.inner_loop import gelu_tanh, gelu_tanh_grad

Array = jax.Array


class QueryReverse(NamedTuple):
  """Per mini-batch (leading dims `...` as the inputs; NH hidden chunks of 64)."""
  x2: Array  # [..., NH, C, 64] bf16: X2b chunks gelu(Q W1'_c + b1'_c), the dW2 operand
  dz2: Array  # [..., C, F] bf16: dZ2b, the cotangent of Z2b = X2b W2' + b2'
  dz1: Array  # [..., NH, C, 64] bf16: dZ1b chunks
  db1: Array  # [..., NH, 64] f32: 1^T dZ1b (float32 dZ1b, before rounding)
  db2: Array  # [..., F] f32: 1^T dZ2b
  dq: Array  # [..., C, F] f32: dOut + sum_c dZ1b_c W1'_c^T
  dgamma: Array  # [..., F] f32: 1^T (dOut * xhat_b)
  dbeta: Array  # [..., F] f32: 1^T dOut


def query_reverse(q: Array, dout: Array, w1: Array, b1: Array, w2: Array, b2: Array,
                  gamma: Array, beta: Array, ln_eps: float) -> QueryReverse:
  """Reverse of every mini-batch's output path from the state after its step.

  q, dout [..., C, F] (cast to bf16 / f32); w1 [..., NH, F, 64] bf16 (W1'[:, chunk c]), b1
  [..., NH, 64] f32, w2 [..., NH, 64, F] bf16 (W2'[chunk c, :]), b2 [..., F] f32 (the kernels'
  chunked state layout); gamma, beta [..., F] f32 (broadcast against q's leading dims).
  """
  f32, bf16 = jnp.float32, jnp.bfloat16
  del beta  # the output's shift: no cotangent flows through it into Z2b
  if w1.shape[-3:-2] != w2.shape[-3:-2] or w1.shape[-2] != q.shape[-1]:
    raise ValueError(f"chunked state shapes do not match q {q.shape}: w1 {w1.shape} (expected "
                     f"[..., NH, {q.shape[-1]}, 64]), w2 {w2.shape} (expected [..., NH, 64, F])")
  qb = q.astype(bf16)
  z1 = jnp.einsum("...cf,...nfh->...nch", qb, w1, preferred_element_type=f32) + b1[..., None, :]
  x2 = gelu_tanh(z1).astype(bf16)  # [..., NH, C, 64]
  z2 = jnp.einsum("...nch,...nhf->...cf", x2, w2, preferred_element_type=f32) + b2[..., None, :]
  mu = jnp.mean(z2, axis=-1, keepdims=True)
  d = z2 - mu
  rstd = jax.lax.rsqrt(jnp.mean(d * d, axis=-1, keepdims=True) + ln_eps)
  xh = d * rstd  # [..., C, F]
  dof = dout.astype(f32)
  dxh = gamma[..., None, :] * dof
  mean = lambda a: jnp.mean(a, axis=-1, keepdims=True)
  dz2 = rstd * (dxh - mean(dxh) - xh * mean(dxh * xh))
  dz2b = dz2.astype(bf16)
  pre = jnp.einsum("...cf,...nhf->...nch", dz2b, w2, preferred_element_type=f32)  # dZ2b W2'_c^T
  dz1 = pre * gelu_tanh_grad(z1)
  dz1b = dz1.astype(bf16)
  dq = dof + jnp.einsum("...nch,...nfh->...cf", dz1b, w1, preferred_element_type=f32)
  return QueryReverse(x2=x2, dz2=dz2b, dz1=dz1b, db1=jnp.sum(dz1, axis=-2),
                      db2=jnp.sum(dz2, axis=-2), dq=dq, dgamma=jnp.sum(dof * xh, axis=-2),
                      dbeta=jnp.sum(dof, axis=-2))
