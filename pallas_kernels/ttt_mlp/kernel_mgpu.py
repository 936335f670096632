"""TTT-MLP forward scan as one Mosaic GPU kernel: the whole inner state on chip, one CTA per head.

Cluster size 1 (the first variant of issue 4): one warpgroup per (b, h) keeps W1, W2 in shared
memory as a bf16 (hi, lo) pair (hi + lo carries ~16 mantissa bits, hi alone is the matmul operand),
b1, b2 in float32, and walks the NC mini-batches with `wgmma` bf16 x bf16 -> f32 matmuls. Per
mini-batch it runs the update (spec §3.4 (1)-(8)) in primal form, then applies the new state to the
queries (9)-(10). The 256-wide hidden dimension is processed as 4 chunks of 64.
Checkpoints of the state are written to HBM before every `group`-th mini-batch.
`python -m pallas_kernels.ttt_mlp.kernel_mgpu` times it against the float32 XLA scan (`kernel_bench`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

CS = 64  # mini-batch size the kernel is built for
F = 64  # head dim
NH = 4  # hidden chunks of 64 (hidden = 4F = 256)
GELU_C = 0.79788456
GELU_C3 = 0.1070322243


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """Frozen kernel configuration (validated for F = CS = 64, hidden 256)."""

  cluster: int = 1
  approx_math: bool = True


def _gelu_and_grad(z):
  """tanh-GELU and its derivative with the official constants ([64, 64] f32)."""
  tau = jnp.tanh(GELU_C * z * (1.0 + 0.044715 * z * z))
  g = 0.5 * z * (1.0 + tau)
  gp = 0.5 * (1.0 + tau) + 0.5 * z * (1.0 - tau * tau) * (GELU_C + GELU_C3 * z * z)
  return g, gp


def _gelu(z):
  return 0.5 * z * (1.0 + jnp.tanh(GELU_C * z * (1.0 + 0.044715 * z * z)))


def _row_bcast(vec, shape):
  """[64] vector along columns -> [64, 64] (same value down each column)."""
  return lax.broadcast_in_dim(vec, shape, [1])


def _col_bcast(vec, shape):
  """[64] vector along rows -> [64, 64] (same value along each row)."""
  return lax.broadcast_in_dim(vec, shape, [0])


def _ln_stats(z, eps):
  mu = jnp.mean(z, axis=1)
  d = z - _col_bcast(mu, z.shape)
  var = jnp.mean(d * d, axis=1)
  rstd = lax.rsqrt(var + eps)
  return d * _col_bcast(rstd, z.shape), rstd


def _ln_l2_grad(z2, target, gam, bet, ln_eps):
  """G2 = d/dZ2 of 0.5 ||gamma LN(Z2) + beta - target||^2 per row (spec §3.4 (4)-(6)), [64, 64] f32.

  gam, bet: [64] vectors over columns (`Layout.WGMMA.reduce(0)`); fused LayerNorm + L2 backward.
  """
  return _ln_l2_parts(z2, target, gam, bet, ln_eps)[0]


def _ln_l2_parts(z2, target, gam, bet, ln_eps):
  """(G2, xhat, rstd, h) of `_ln_l2_grad`: h = gamma xhat + beta - target (G2 = rstd-scaled
  projection of gamma h); the parts the backward kernel's reverse of the LayerNorm-L2 step uses."""
  shp = z2.shape
  xh, rstd = _ln_stats(z2, ln_eps)
  h = _row_bcast(gam, shp) * xh + _row_bcast(bet, shp) - target
  gg = _row_bcast(gam, shp) * h
  s1 = jnp.sum(gg, axis=1)
  s2 = jnp.sum(gg * xh, axis=1)
  g2 = (F * gg - _col_bcast(s1, shp) - xh * _col_bcast(s2, shp)) * _col_bcast(rstd / F, shp)
  return g2, xh, rstd, h


def wgmma_multi(pairs, shape=(64, 64)):
  """Independent a @ b products issued together, one wait: tuple of `shape` f32 (inside a kernel)."""
  def fn(*accs):
    for acc, (a, b) in zip(accs, pairs):
      plgpu.wgmma(acc, a, b)
    return tuple(acc[...] for acc in accs)
  return pl.run_scoped(fn, *[plgpu.ACC(shape, jnp.float32) for _ in pairs])


def wgmma_chain(pairs, shape=(64, 64)):
  """sum_i a_i @ b_i accumulated on the tensor cores, one wait (inside a kernel)."""
  return wgmma_chains([pairs], shape)[0]


def wgmma_chains(chains, shape=(64, 64)):
  """Independent sums sum_i a_i @ b_i, one per chain, issued together, one wait (inside a kernel)."""
  def fn(*accs):
    for acc, pairs in zip(accs, chains):
      for a, b in pairs:
        plgpu.wgmma(acc, a, b)
    return tuple(acc[...] for acc in accs)
  return pl.run_scoped(fn, *[plgpu.ACC(shape, jnp.float32) for _ in chains])


def mlp_forward(xs, *, w1h, w2h, b1_s, x_s, chunks: int, shape=(64, 64)):
  """gelu(xs W1 + b1) W2 (no b2) over `chunks` hidden chunks of 64 held in SMEM (inside a kernel).

  Two waited wgmma groups; the bf16 X2 chunks are left in `x_s` for the update phase.
  """
  z1s = wgmma_multi([(xs, w1h.at[c]) for c in range(chunks)], shape)
  for c in range(chunks):
    b1c = plgpu.load(b1_s.at[c], layout=plgpu.Layout.WGMMA.reduce(0))
    x_s[c] = _gelu(z1s[c] + _row_bcast(b1c, shape)).astype(jnp.bfloat16)
  plgpu.commit_smem()
  return wgmma_chain([(x_s.at[c], w2h.at[c]) for c in range(chunks)], shape)


def build_forward(BH: int, NC: int, group: int, ln_eps: float, interpret=None,
                  batched: bool = True, ablate: frozenset = frozenset()):
  """Returns f(q, k, v, eta, gamma, beta, w1h, w1l, b1, w2h, w2l, b2) -> (out, ckpts).

  q, k, v: [BH, NC, 64, 64] bf16; eta: [BH, NC, 64] f32; gamma, beta: [BH, 64] f32;
  w1h/w1l: [BH, 4, 64, 64] bf16 (chunk c = W1[:, 64c:64c+64]); w2h/w2l: [BH, 4, 64, 64] bf16
  (chunk c = W2[64c:64c+64, :]); b1: [BH, 4, 64] f32; b2: [BH, 64] f32.
  ckpts: the same six state arrays with a [NG] axis after BH (state before mini-batch g*group).
  batched=False is v1 (every wgmma waited on its own); True (v2) issues independent wgmmas
  together and waits once (12 waits per mini-batch instead of 32; 4 more SMEM tiles for X2).
  ablate: for timing attribution only (results are WRONG): any of "A" (skip the key forward), "B"
  (skip gradients + update), "C" (skip the query forward),
  "Bsum" (skip the bias column sums), "Bw" (skip the (hi, lo) read-modify-write of W).
  """
  NG = -(-NC // group)
  bf16, f32 = jnp.bfloat16, jnp.float32
  tr = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  tile = lambda *lead: plgpu.SMEM(lead + (64, 64), bf16, transforms=tr)

  def body(q_ref, k_ref, v_ref, eta_ref, g_ref, bt_ref, w1h_ref, w1l_ref, b1_ref, w2h_ref,
           w2l_ref, b2_ref, o_ref, cw1h, cw1l, cb1, cw2h, cw2l, cb2,
           q_s, k_s, v_s, ek_s, g2_s, g1_s, ex2_s, w1h, w1l, w2h, w2l,
           eta_s, b1_s, b2_s, gam_s, bet_s, bars, *x_s):
    x_s = x_s[0] if x_s else None
    bh = lax.axis_index("bh")
    # ---- initial state, gamma, beta
    plgpu.copy_gmem_to_smem(w1h_ref.at[bh], w1h, bars.at[0])
    plgpu.copy_gmem_to_smem(w1l_ref.at[bh], w1l, bars.at[1])
    plgpu.copy_gmem_to_smem(w2h_ref.at[bh], w2h, bars.at[2])
    plgpu.copy_gmem_to_smem(w2l_ref.at[bh], w2l, bars.at[3])
    plgpu.copy_gmem_to_smem(b1_ref.at[bh], b1_s, bars.at[4])
    plgpu.copy_gmem_to_smem(b2_ref.at[bh], b2_s, bars.at[5])
    plgpu.copy_gmem_to_smem(g_ref.at[bh], gam_s, bars.at[6])
    plgpu.copy_gmem_to_smem(bt_ref.at[bh], bet_s, bars.at[7])
    for i in range(8):
      plgpu.barrier_wait(bars.at[i])

    red0 = plgpu.Layout.WGMMA.reduce(0)
    red1 = plgpu.Layout.WGMMA.reduce(1)
    shp = (64, 64)

    def mm(a, b, init=None):
      """init + a @ b on the tensor cores (f32 accumulator)."""
      def fn(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]
      r = pl.run_scoped(fn, plgpu.ACC(shp, f32))
      return r if init is None else init + r

    mm_multi = functools.partial(wgmma_multi, shape=shp)

    mlp_fwd = functools.partial(mlp_forward, w1h=w1h, w2h=w2h, b1_s=b1_s, x_s=x_s, chunks=NH)

    @pl.loop(0, NC)
    def step(m):
      # ---- checkpoint before mini-batch m when m % group == 0
      @pl.when(m % group == 0)
      def _():
        gi = m // group
        plgpu.copy_smem_to_gmem(w1h, cw1h.at[bh, gi])
        plgpu.copy_smem_to_gmem(w1l, cw1l.at[bh, gi])
        plgpu.copy_smem_to_gmem(w2h, cw2h.at[bh, gi])
        plgpu.copy_smem_to_gmem(w2l, cw2l.at[bh, gi])
        plgpu.copy_smem_to_gmem(b1_s, cb1.at[bh, gi])
        plgpu.copy_smem_to_gmem(b2_s, cb2.at[bh, gi])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

      plgpu.copy_gmem_to_smem(q_ref.at[bh, m], q_s, bars.at[0])
      plgpu.copy_gmem_to_smem(k_ref.at[bh, m], k_s, bars.at[1])
      plgpu.copy_gmem_to_smem(v_ref.at[bh, m], v_s, bars.at[2])
      plgpu.copy_gmem_to_smem(eta_ref.at[bh, m], eta_s, bars.at[3])
      for i in range(4):
        plgpu.barrier_wait(bars.at[i])

      eta_c = plgpu.load(eta_s, layout=red1)  # [64] over rows j
      gam = plgpu.load(gam_s, layout=red0)  # [64] over columns f
      bet = plgpu.load(bet_s, layout=red0)
      kf = k_s[...].astype(f32)
      ek_s[...] = (-_col_bcast(eta_c, shp) * kf).astype(bf16)  # -diag(eta) K

      # ---- (1)-(3): Z2 = gelu(K W1 + b1) W2 + b2
      if "A" in ablate:
        z2 = kf
      elif batched:
        z2 = mlp_fwd(k_s)
      else:
        z2 = None
        for c in range(NH):  # ex2_s is free outside the update phase: the gelu tile goes there
          b1c = plgpu.load(b1_s.at[c], layout=red0)
          z1 = mm(k_s, w1h.at[c]) + _row_bcast(b1c, shp)
          ex2_s[...] = _gelu(z1).astype(bf16)
          plgpu.commit_smem()
          z2 = mm(ex2_s, w2h.at[c], z2)
      b2v = plgpu.load(b2_s, layout=red0)
      z2 = z2 + _row_bcast(b2v, shp)
      # ---- (4)-(6): fused LayerNorm + L2 backward
      g2 = _ln_l2_grad(z2, v_s[...].astype(f32) - kf, gam, bet, ln_eps)
      g2_s[...] = g2.astype(bf16)
      db2 = 0.0 if "Bsum" in ablate else jnp.sum(_col_bcast(eta_c, shp) * g2, axis=0)
      plgpu.commit_smem()
      # ---- (7)-(8) per hidden chunk: G1 = (G2 W2^T) * gelu'(Z1) with the old W2 (Z1, X2
      # recomputed), then the float32 state update through the (hi, lo) pair.
      for c in range(0 if "B" in ablate else NH):
        b1c = plgpu.load(b1_s.at[c], layout=red0)
        if batched:
          z1, gw = mm_multi([(k_s, w1h.at[c]), (g2_s, w2h.at[c].T)])
        else:
          z1 = mm(k_s, w1h.at[c])
          gw = mm(g2_s, w2h.at[c].T)
        z1 = z1 + _row_bcast(b1c, shp)
        x2, gp = _gelu_and_grad(z1)
        g1 = gw * gp
        g1_s[...] = g1.astype(bf16)
        ex2_s[...] = (-_col_bcast(eta_c, shp) * x2).astype(bf16)  # -diag(eta) X2
        if "Bsum" not in ablate:
          b1_s[c] = b1c - jnp.sum(_col_bcast(eta_c, shp) * g1, axis=0)
        plgpu.commit_smem()
        if batched:
          d1, d2 = mm_multi([(ek_s.T, g1_s), (ex2_s.T, g2_s)])
        else:
          d1 = mm(ek_s.T, g1_s)
          d2 = mm(ex2_s.T, g2_s)
        if "Bw" in ablate:
          w1h[c] = d1.astype(bf16)
          w2h[c] = d2.astype(bf16)
          continue
        w = w1h[c].astype(f32) + w1l[c].astype(f32) + d1
        hi = w.astype(bf16)
        w1h[c] = hi
        w1l[c] = (w - hi.astype(f32)).astype(bf16)
        w = w2h[c].astype(f32) + w2l[c].astype(f32) + d2
        hi = w.astype(bf16)
        w2h[c] = hi
        w2l[c] = (w - hi.astype(f32)).astype(bf16)
      b2_s[...] = b2v - db2
      plgpu.commit_smem()
      # ---- (9)-(10): apply the new state to the queries
      if "C" in ablate:
        z2b = kf
      elif batched:
        z2b = mlp_fwd(q_s)
      else:
        z2b = None
        for c in range(NH):  # ex2_s is free outside the update phase: the gelu tile goes there
          b1c = plgpu.load(b1_s.at[c], layout=red0)
          z1b = mm(q_s, w1h.at[c]) + _row_bcast(b1c, shp)
          ex2_s[...] = _gelu(z1b).astype(bf16)
          plgpu.commit_smem()
          z2b = mm(ex2_s, w2h.at[c], z2b)
      z2b = z2b + _row_bcast(plgpu.load(b2_s, layout=red0), shp)
      xhb, _ = _ln_stats(z2b, ln_eps)
      out = q_s[...].astype(f32) + _row_bcast(gam, shp) * xhb + _row_bcast(bet, shp)
      q_s[...] = out.astype(bf16)  # q_s doubles as the output tile
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_s, o_ref.at[bh, m])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    plgpu.wait_smem_to_gmem(0)

  st = lambda *s: jax.ShapeDtypeStruct(s, bf16)
  sf = lambda *s: jax.ShapeDtypeStruct(s, f32)
  out_type = (st(BH, NC, 64, 64), st(BH, NG, NH, 64, 64), st(BH, NG, NH, 64, 64),
              sf(BH, NG, NH, 64), st(BH, NG, NH, 64, 64), st(BH, NG, NH, 64, 64), sf(BH, NG, 64))
  scratch = [tile(), tile(), tile(), tile(), tile(), tile(), tile(), tile(NH), tile(NH),
             tile(NH), tile(NH),
             plgpu.SMEM((64,), f32), plgpu.SMEM((NH, 64), f32), plgpu.SMEM((64,), f32),
             plgpu.SMEM((64,), f32), plgpu.SMEM((64,), f32),
             plgpu.Barrier(num_barriers=8)] + ([tile(NH)] if batched else [])
  kwargs = {}
  if interpret is not None:
    kwargs["interpret"] = interpret
  return plgpu.kernel(
      body, out_type=out_type, scratch_types=scratch, grid=(BH,), grid_names=("bh",),
      compiler_params=plgpu.CompilerParams(approx_math=True), **kwargs)


def main(argv=None) -> dict[str, float]:
  """Times v1/v2 (state as bf16 (hi, lo) in SMEM) against the float32 XLA scan (`kernel_bench.forward_main`):
  `python -m pallas_kernels.ttt_mlp.kernel_mgpu [--nc N] [--variants V,...] [--interpret]`."""
  from pallas_kernels import kernel_bench
  variants = ("v1", "v2")
  return kernel_bench.forward_main(argv, main.__doc__, variants, ("v2",), layer="mlp")


if __name__ == "__main__":
  main()
