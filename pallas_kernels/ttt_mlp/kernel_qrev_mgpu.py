"""The queries' reverse of the TTT-MLP backward as a Mosaic GPU kernel: one CTA per mini-batch.

`query_reverse.query_reverse` (XLA) is the reference: same math, same bf16 roundings of X2b,
dZ2b, dZ1b. Every mini-batch's output path reads only the state after its step (written by the
backward's restarts), so the grid is (head, step), all independent: the intermediates (Z1, the
LayerNorm, gelu') stay in registers and SMEM instead of round-tripping as float32 arrays through
HBM, which is what made the XLA version cost ~8 ms per NC=282 backward on an H100.

Per CTA (whole hidden dim, 4 chunks of 64): Z2b = gelu(Q W1' + b1') W2' + b2' (X2b chunks out),
dZ2b = LN backward of gamma dOut (out), dZ1b_c = (dZ2b W2'_c^T) gelu'(Q W1'_c + b1'_c) (out),
dQ = dOut + sum_c dZ1b_c W1'_c^T, and the column sums db1, db2, dgamma, dbeta of the step.
H100 (B=1, H=48, NC=282: 18 groups of 16 in one launch): 1.50 ms per backward (profiler trace).
`python -m pallas_kernels.ttt_mlp.kernel_qrev_mgpu` times it against the XLA reference.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mgpu_common import DEFAULT_REDUCTION_SCRATCH, compiler_params, copy_in
from pallas_kernels.ttt_mlp.kernel_bwd_mgpu import _gelu_grad
from pallas_kernels.ttt_mlp.kernel_mgpu import (NH, _col_bcast, _ln_stats, _row_bcast,
                                                mlp_forward, wgmma_chain, wgmma_multi)


@dataclasses.dataclass(frozen=True)
class QrevTuningConfig:
  """Frozen configuration of the queries' reverse kernel (F = CS = 64, hidden 256)."""

  approx_math: bool = True  # tanh.approx / rsqrt.approx, as the other kernels
  reduction_scratch: int = DEFAULT_REDUCTION_SCRATCH  # SMEM for column sums' cross-warp reductions


def build_query_reverse(BH: int, S: int, G: int, ln_eps: float, *,
                        config: QrevTuningConfig = QrevTuningConfig(), dq_dtype=jnp.float32,
                        interpret=None):
  """Returns f(q, do, sw1, sb1, sw2, sb2, gam) over the NS = S G steps of one backward launch.

  q, do [BH, NS, 64, 64] bf16; sw1, sw2 [BH * S, G + 1, 4, 64, 64] bf16, sb1 [BH * S, G + 1, 4,
  64] f32, sb2 [BH * S, G + 1, 64] f32 (the restarts' per-step states: row bh * S + m // G, column
  m % G + 1 is the state after step m); gam [BH, 64] f32.
  Results (per step m, as `query_reverse.QueryReverse`): x2 [BH, NS, 4, 64, 64] bf16, dz2 [BH, NS,
  64, 64] bf16, dz1 [BH, NS, 4, 64, 64] bf16, db1 [BH, NS, 4, 64], db2, dq ([BH, NS, 64, 64] in
  `dq_dtype`, dOut included), dgamma, dbeta [BH, NS, 64] f32. dq_dtype=bf16: dQ rounded to nearest
  even in the kernel (what the caller's cast of the float32 dQ to a bf16 Q's dtype gives), half the
  bytes written, and no XLA convert after it.
  """
  if dq_dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError(f"dq_dtype must be float32 or bfloat16, got {dq_dtype}")
  NS = S * G
  bf16, f32 = jnp.bfloat16, jnp.float32
  shp = (64, 64)
  tr = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  tr32 = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))
  tile = lambda *lead: plgpu.SMEM(lead + shp, bf16, transforms=tr)
  vec = lambda *lead: plgpu.SMEM(lead + (64,), f32)
  red0 = plgpu.Layout.WGMMA.reduce(0)
  row = lambda v: _row_bcast(v, shp)
  col = lambda v: _col_bcast(v, shp)
  mean_f = lambda x: jnp.mean(x, axis=1)
  sum_c = lambda x: jnp.sum(x, axis=0)

  def body(q_ref, do_ref, sw1_ref, sb1_ref, sw2_ref, sb2_ref, g_ref,
           x2_ref, dz2_ref, dz1_ref, db1_ref, db2_ref, dq_ref, dgam_ref, dbet_ref,
           q_s, do_s, w1_s, w2_s, x_s, dq_s, b1_s, b2_s, gam_s, db1_s, db2_s, dgam_s, dbet_s,
           bars):
    bh, m = lax.axis_index("bh"), lax.axis_index("m")
    g, i = bh * S + m // G, m % G + 1  # the state after step m
    copy_in(((q_ref.at[bh, m], q_s), (do_ref.at[bh, m], do_s), (sw1_ref.at[g, i], w1_s),
             (sw2_ref.at[g, i], w2_s), (sb1_ref.at[g, i], b1_s), (sb2_ref.at[g, i], b2_s),
             (g_ref.at[bh], gam_s)), bars)
    # ---- forward: Z2b (X2b chunks left in x_s), LayerNorm statistics
    z2 = mlp_forward(q_s, w1h=w1_s, w2h=w2_s, b1_s=b1_s, x_s=x_s, chunks=NH)
    plgpu.copy_smem_to_gmem(x_s, x2_ref.at[bh, m])
    z2 = z2 + row(plgpu.load(b2_s, layout=red0))
    xhb, rstdb = _ln_stats(z2, ln_eps)
    # ---- out = Q + gamma xhb + beta: dgamma, dbeta, dZ2b
    dof = do_s[...].astype(f32)
    dgam_s[...] = sum_c(dof * xhb)
    dbet_s[...] = sum_c(dof)
    dxhb = row(plgpu.load(gam_s, layout=red0)) * dof
    dz2 = col(rstdb) * (dxhb - col(mean_f(dxhb)) - xhb * col(mean_f(dxhb * xhb)))
    db2_s[...] = sum_c(dz2)
    do_s[...] = dz2.astype(bf16)  # dOut is in registers (dof) from here
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(do_s, dz2_ref.at[bh, m])
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # x_s (X2b) is rewritten below
    # ---- dZ1b per chunk, then dQ
    for c in range(NH):
      z1, pre = wgmma_multi([(q_s, w1_s.at[c]), (do_s, w2_s.at[c].T)], shp)
      dz1 = pre * _gelu_grad(z1 + row(plgpu.load(b1_s.at[c], layout=red0)))
      db1_s[c] = sum_c(dz1)
      x_s[c] = dz1.astype(bf16)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(x_s, dz1_ref.at[bh, m])
    dq_s[...] = (dof + wgmma_chain([(x_s.at[c], w1_s.at[c].T) for c in range(NH)],
                                   shp)).astype(dq_dtype)
    plgpu.commit_smem()
    for src, dst in ((dq_s, dq_ref), (db1_s, db1_ref), (db2_s, db2_ref), (dgam_s, dgam_ref),
                     (dbet_s, dbet_ref)):
      plgpu.copy_smem_to_gmem(src, dst.at[bh, m])
    plgpu.wait_smem_to_gmem(0)

  st = lambda *s: jax.ShapeDtypeStruct(s, bf16)
  sf = lambda *s: jax.ShapeDtypeStruct(s, f32)
  out_type = (st(BH, NS, NH, 64, 64), st(BH, NS, 64, 64), st(BH, NS, NH, 64, 64),
              sf(BH, NS, NH, 64), sf(BH, NS, 64),
              jax.ShapeDtypeStruct((BH, NS, 64, 64), dq_dtype), sf(BH, NS, 64),
              sf(BH, NS, 64))
  scratch = [tile(), tile(), tile(NH), tile(NH), tile(NH),  # q, dOut / dZ2b, W1', W2', X2b / dZ1b
             tile() if dq_dtype == bf16 else plgpu.SMEM(shp, f32, transforms=tr32),  # dQ staging
             vec(NH), vec(), vec(), vec(NH), vec(), vec(), vec(),  # b1 b2 gamma db1 db2 dgam dbet
             plgpu.Barrier(num_barriers=7)]
  kwargs = {} if interpret is None else {"interpret": interpret}
  return plgpu.kernel(body, out_type=out_type, scratch_types=scratch, grid=(BH, NS),
                      grid_names=("bh", "m"),
                      compiler_params=compiler_params(config.approx_math, None,
                                                      config.reduction_scratch), **kwargs)


def main(argv=None) -> dict[str, float]:
  """Times the kernel against its XLA reference (`query_reverse`) at one backward launch's
  shapes (B=1 heads, S groups of G steps; `kernel_bench.report`):
  `python -m pallas_kernels.ttt_mlp.kernel_qrev_mgpu [--heads 48] [--groups 18] [--interpret]`."""
  from pallas_kernels import kernel_bench
  from pallas_kernels.ttt_mlp import query_reverse
  a = kernel_bench.parse_flags(argv, main.__doc__, ("kernel",), groups=18)
  BH, S, G = a.heads, a.groups, a.group
  ks = jax.random.split(jax.random.PRNGKey(0), 8)
  n = lambda k, s, sc=1.0: sc * jax.random.normal(k, s)
  bf = jnp.bfloat16
  q, do = n(ks[0], (BH, S * G, 64, 64)).astype(bf), n(ks[1], (BH, S * G, 64, 64)).astype(bf)
  sw1 = n(ks[2], (BH * S, G + 1, NH, 64, 64), 0.1).astype(bf)
  sw2 = n(ks[3], (BH * S, G + 1, NH, 64, 64), 0.1).astype(bf)
  sb1, sb2 = n(ks[4], (BH * S, G + 1, NH, 64), 0.1), n(ks[5], (BH * S, G + 1, 64), 0.1)
  gam, bet = 1.0 + n(ks[6], (BH, 64), 0.1), n(ks[7], (BH, 64), 0.1)
  args = (q, do, sw1, sb1, sw2, sb2, gam, bet)
  kern = build_query_reverse(BH, S, G, 1e-6, interpret=kernel_bench.interpret_params(a))
  after = lambda x: x[:, 1:].reshape((BH, S * G) + x.shape[2:])
  ref = lambda q, do, w1, b1, w2, b2, g, b: query_reverse.query_reverse(
      q, do, after(w1), after(b1), after(w2), after(b2), g[:, None], b[:, None], 1e-6)
  name = f"TTT-MLP queries' reverse, BH={BH}, {S} x {G} steps"
  return {"kernel": kernel_bench.report(name, lambda *x: kern(*x[:7]), args, ref, args, a.reps)}


if __name__ == "__main__":
  main()
