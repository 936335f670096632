"""TTT-MLP backward over one checkpoint group as a Mosaic GPU kernel (the reverse of the scan).

The math is `backward_reference.step_reverse` (hand-derived VJP of one primal-form step), run for
the group's mini-batches in reverse. The group's per-step states are NOT recomputed here: the
caller (`ttt_mlp._bwd_pallas`) first runs the forward kernel over the group with checkpoints every
mini-batch, which gives the bf16 operand copy of the state before each step m (W_m) and after it
(W_{m+1}), plus the float32 biases. Per step this kernel then
  R  re-runs the step's forward from those states: Z1 = K W1 + b1, X2 = gelu(Z1), Z2 = X2 W2 + b2
     (all-reduced over the hidden shards), LayerNorm/L2 gradient G2; the query path with the new
     state: Z1b = Q W1' + b1', X2b, Z2b (all-reduced), xhb, rstdb;
  A  reverses the query path (out = Q + LN(Z2b)): dZ2b, dW2 += X2b^T dZ2b, dZ1b, dW1 += Q^T dZ1b,
     dQ partial = dZ1b W1'^T;
  U  reverses the update W1' = W1 - K^T(e G1), W2' = W2 - X2^T(e G2) (+ biases): K dW1, X2 dW2,
     dG1, dP, dG2 (all-reduced), the LayerNorm-L2 gradient's own VJP (dg, dxh, dstd), dZ2, dX2,
     dZ1, dW2 += dP^T G2 + X2^T dZ2, dW1 += K^T dZ1, dK partial = (-e G1) dW1^T + dZ1 W1^T.
The state cotangents dW1, dW2 (float32, this CTA's hidden shard) are wgmma accumulators carried
through the step loop; db1, db2, dgamma, dbeta are float32 vectors in SMEM.

Hidden dim 256 is split over a cluster of `cluster` CTAs (as the v3 forward, `kernel_acc_mgpu`).
Only three [64, 64] float32 all-reduces per step (Z2, Z2b, dG2: DSMEM push + local add,
two receive slots alternating; the step loop is unrolled by 2, so G must be even); the
other products that sum over the hidden dim (dQ, dK, deta) are written out per CTA as partials
and summed by the caller (outputs with a [cluster] axis). cluster=1 (everything in one CTA) is
what CPU interpret mode runs; cluster=2 is the GPU kernel (lowered for CUDA in the CPU tests).
Matmul operands are bf16 (as in the forward kernel); accumulation and all elementwise math f32.
`python -m pallas_kernels.ttt_mlp.kernel_bwd_mgpu` times it against jax.grad of the float32 XLA scan (`kernel_bench`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mgpu_common import (DEFAULT_REDUCTION_SCRATCH, KernelParts, Phases, Profile,
                                        check_cluster, copy_in, per_head_kernel)
from pallas_kernels.ttt_mlp.kernel_mgpu import (F, GELU_C, GELU_C3, NH, _col_bcast, _ln_stats,
                                                _row_bcast, mlp_forward, wgmma_chain,
                                                wgmma_chains, wgmma_multi)


@dataclasses.dataclass(frozen=True)
class BwdTuningConfig:
  """Frozen backward-kernel configuration (validated for F = CS = 64, hidden 256)."""

  cluster: int = 2  # CTAs per head; hidden 256 / cluster per CTA
  approx_math: bool = True  # tanh.approx / rsqrt.approx in GELU and LayerNorm
  # SMEM bytes for column sums' cross-warp reductions (`mgpu_common.DEFAULT_REDUCTION_SCRATCH`)
  reduction_scratch: int = DEFAULT_REDUCTION_SCRATCH
  # dW1, dW2 (float32) kept in the dw1/dw2 outputs in GMEM (L2-resident) and loaded/stored by the
  # threads around each of the two updates per step, instead of 128 accumulator registers per
  # thread carried through the step loop (register pressure / spills in the update reverse).
  dw_gmem: bool = False
  # The key and query halves' forward activations (X2 chunks, Z2) come from the restart
  # (`AccTuningConfig(save_activations=True)`) as 4 extra inputs instead of being recomputed:
  # no forward matmuls and 1 cluster exchange per step instead of 3 (same values, bitwise).
  saved_forward: bool = False
  # The queries' reverse (dZ2b, dZ1b, dQ, the output's dgamma/dbeta) comes from outside
  # (`query_reverse`, computed for all steps at once: it feeds nothing later in the scan); per step
  # the kernel only adds what it contributes to the state cotangent (dW2 += X2b^T dZ2b, dW1 +=
  # Q^T dZ1b, db1, db2) from loaded tiles. Implies the keys' saved activations, as the restart
  # writes them with `AccTuningConfig(save_ln=True)`: X2 chunks and the LayerNorm-L2 parts G2,
  # xhat, h (bf16) and rstd, so the step starts without a LayerNorm (and V is not read).
  query_pass: bool = False
  # query_pass: a step's loads are issued at once in the order they are first used and each is
  # waited just before its first use (not all at the step's start), so the later tiles' TMA
  # latency overlaps the queries' contributions and the first update phase; the sb2 load (unread
  # with query_pass) is dropped.
  lazy_waits: bool = False
  # Column sums (cross-warp reductions, rounds of 2 warpgroup barriers through SMEM) fused as in
  # the forward's `WsTuningConfig.fused_bias_sums`: 0 none; 1 the LayerNorm-L2 VJP's three
  # (dgamma, dbeta, db2) as ONE reduction of their [64, 192] concatenation; 2 also db1's two
  # chunks as one [64, 128] reduction (chunk 0's dZ1 kept in registers over chunk 1's wgmmas).
  # Each column's tree is the same: bitwise the separate sums on the GPU (H100; in interpret mode
  # XLA:CPU orders the wider sum differently: ~1e-6). The scratch grows with the widest fused sum
  # (`scratch_bytes`), so it takes as many rounds as one [64, 64] sum did. H100, NC=282: 3-5%
  # SLOWER (the fused sum's three live [64, 64] products add spills): `ttt_mlp.BWD_FUSED_SUMS`.
  fused_sums: int = 0

  def __post_init__(self):
    check_cluster(self.cluster)
    if self.fused_sums not in (0, 1, 2):
      raise ValueError(f"fused_sums must be 0, 1 or 2, got {self.fused_sums!r}")
    if self.lazy_waits and not self.query_pass:
      raise ValueError("lazy_waits=True is built only with query_pass=True")
    if self.query_pass and (self.dw_gmem or not self.saved_forward):
      raise ValueError("query_pass=True is built with saved_forward=True and dw_gmem=False; got "
                       f"saved_forward={self.saved_forward}, dw_gmem={self.dw_gmem}")

  @property
  def scratch_bytes(self) -> int:
    """SMEM bytes for cross-warp reductions: `reduction_scratch` per [64, 64] part of the widest
    column sum (3 parts with fused_sums, else 1)."""
    return (3 if self.fused_sums else 1) * self.reduction_scratch


def _gelu_grads(z):
  """(gelu'(z), gelu''(z)) of the tanh-GELU with the official constants ([64, 64] f32)."""
  tau = jnp.tanh(GELU_C * z * (1.0 + 0.044715 * z * z))
  du = GELU_C + GELU_C3 * z * z
  sech2 = 1.0 - tau * tau
  gp = 0.5 * (1.0 + tau) + 0.5 * z * sech2 * du
  gpp = sech2 * (du - z * tau * du * du + GELU_C3 * z * z)
  return gp, gpp


def _gelu_grad(z):
  tau = jnp.tanh(GELU_C * z * (1.0 + 0.044715 * z * z))
  return 0.5 * (1.0 + tau) + 0.5 * z * (1.0 - tau * tau) * (GELU_C + GELU_C3 * z * z)


def build_backward(BH: int, G: int, ln_eps: float, *, groups: int = 1,
                   config: BwdTuningConfig = BwdTuningConfig(), interpret=None,
                   ablate: frozenset = frozenset(), profile: Profile | None = None,
                   parts: bool = False):
  """Returns the backward kernel f(...) over `groups` consecutive checkpoint groups of G
  mini-batches (NS = groups * G steps, walked from the last to the first) in one launch.

  Arguments (at least NS steps of inputs are passed; the first NS are used):
    q, k, v    [BH, >=NS, 64, 64] bf16     eta [BH, >=NS, 64] f32     dout [BH, NS, 64, 64] bf16
    gamma, beta [BH, 64] f32
    sw1, sw2   [BH * groups, G + 1, 4, 64, 64] bf16: row bh * groups + g, column i = the state
               before step g * G + i (i = 0..G), W1[:, chunk] / W2[chunk, :] (the per-step
               checkpoint hi parts of the forward kernel restarted per group)
    sb1 [BH * groups, G + 1, 4, 64] f32, sb2 [BH * groups, G + 1, 64] f32: biases, likewise
    dw1, dw2   [BH, 4, 64, 64] f32, db1 [BH, 4, 64] f32, db2 [BH, 64] f32: cotangent of the
               state after the last group
  saved_forward: 4 more arguments after db2: kx2 [BH * groups, G + 1, 4, 64, 64] bf16, kz2
  [BH * groups, G + 1, 64, 64] f32, qx2, qz2 (likewise): the keys' / queries' X2 chunks and Z2
  (+ b2) of each step, as the restart saved them.
  query_pass: instead 9 more arguments after db2: kx2 (as above), kg2, kxh, kh [BH * groups,
  G + 1, 64, 64] bf16 and krstd [BH * groups, G + 1, 64] f32 (the keys' G2, xhat, h, rstd), then
  per step from `query_reverse`: qx2 [BH, NS, 4, 64, 64] bf16, dz1 [BH, NS, 4, 64, 64] bf16, db1q
  [BH, NS, 4, 64] f32, db2q [BH, NS, 64] f32; `dout` is dZ2b [BH, NS, 64, 64] bf16 (not the
  output's cotangent) and `v` is not read. No dq_part result (the first result is dk_part);
  dgamma/dbeta are the keys' part.
  parts=True: the kernel's `KernelParts` instead (to run it as one role of a launch).
  ablate: for timing attribution only (results are WRONG): "X" (no cluster exchange), "R" (no
  forward recompute matmuls), "U" (stop each step after dQ: no reverse of the update).
  Results:
    dq_part, dk_part [BH, C, NS, 64, 64] bf16: per-CTA partials; dQ = sum_C dq_part + dout,
                      dK = sum_C dk_part - dV
    dv [BH, NS, 64, 64] bf16; deta_part [BH, C, NS, 64] f32 (deta = sum over C)
    dgamma, dbeta [BH, 64] f32 (these groups' contribution)
    dw1, db1, dw2, db2: cotangent of the state before the first group (layout of the inputs)
  """
  if G % 2:
    raise ValueError(f"the group size must be even (two steps per loop iteration), got {G}")
  if groups < 1:
    raise ValueError(f"groups must be >= 1, got {groups}")
  NS = groups * G
  C = config.cluster
  NL = NH // C  # hidden chunks of 64 per CTA
  bf16, f32 = jnp.bfloat16, jnp.float32
  shp = (64, 64)
  tr = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  tr32 = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))
  tile = lambda *lead: plgpu.SMEM(lead + shp, bf16, transforms=tr)
  red0 = plgpu.Layout.WGMMA.reduce(0)  # [64] over columns (a row sum's result)
  red1 = plgpu.Layout.WGMMA.reduce(1)  # [64] over rows
  row = lambda v: _row_bcast(v, shp)
  col = lambda v: _col_bcast(v, shp)
  mean_f = lambda x: jnp.mean(x, axis=1)
  sum_c = lambda x: jnp.sum(x, axis=0)

  SF = config.saved_forward
  QP = config.query_pass
  fs = config.fused_sums

  def body(*refs, bh=None):
    if not SF:
      return body_(*refs, saved=None, bh=bh)
    if QP:  # 9 extra inputs after db2_in; no dq_part result
      return body_(*refs[:15], None, *refs[24:], saved=refs[15:24], bh=bh)
    return body_(*refs[:15], *refs[19:], saved=refs[15:19], bh=bh)  # (4 saved inputs after db2_in)

  def body_(q_ref, k_ref, v_ref, eta_ref, do_ref, g_ref, bt_ref, sw1_ref, sb1_ref, sw2_ref,
           sb2_ref, dw1_in, db1_in, dw2_in, db2_in,
           dq_ref, dk_ref, dv_ref, de_ref, dgam_ref, dbet_ref, dw1_out, db1_out, dw2_out,
           db2_out,
           q_s, k_s, v_s, do_s, w1_s, w2_s, nw1_s, nw2_s, x_s, xb_s, g1_s, g2_s, dz_s, xh_s,
           eta_s, b1_s, nb1_s, b2_s, nb2_s, gam_s, bet_s, de_s, db1_a, db2_a, dgam_a, dbet_a,
           xb0, xb1, bars, *rest, saved, bh=None):
    bh = lax.axis_index("bh") if bh is None else bh  # (a row given: `KernelParts`)
    r = lax.axis_index("c") if C > 1 else 0
    c0 = r * NL
    xbuf = (xb0, xb1)  # exchange slots (one allocation each) / f32 staging
    rstd_s = rest[-1] if QP else None  # query_pass: the keys' rstd [64] (the last scratch)
    if C > 1:
      rb0, rb1, cbar = rest[:3]
      rbars = (rb0, rb1)
      zp = [q_s, do_s]  # dZ1 (partial, then full) per chunk: tiles dead by then
    else:
      zp = [q_s, do_s, rest[0].at[0], rest[0].at[1]]

    def on_rank0(fn):
      if C == 1:
        fn()
      else:
        pl.when(r == 0)(fn)

    # ---- initial cotangents (state after the group) and gamma, beta
    for ref, src in ((db1_a, db1_in.at[bh, pl.ds(c0, NL)]), (db2_a, db2_in.at[bh]),
                     (gam_s, g_ref.at[bh]), (bet_s, bt_ref.at[bh])):
      plgpu.copy_gmem_to_smem(src, ref, bars.at[0])
      plgpu.barrier_wait(bars.at[0])

    def load_f32_tile(src):
      plgpu.copy_gmem_to_smem(src, xb0, bars.at[0])
      plgpu.barrier_wait(bars.at[0])
      return plgpu.layout_cast(xb0[...], plgpu.Layout.WGMMA)

    gm = config.dw_gmem
    ld_dw = lambda ref, c: plgpu.load(ref.at[bh, c0 + c], layout=plgpu.Layout.WGMMA,
                                      optimized=False)

    def st_dw(ref, vals):
      for c in range(NL):
        ref.at[bh, c0 + c][...] = vals[c]

    if gm:  # the outputs are the running dW (each thread re-reads only what it wrote)
      st_dw(dw1_out, [ld_dw(dw1_in, c) for c in range(NL)])
      st_dw(dw2_out, [ld_dw(dw2_in, c) for c in range(NL)])
      dw1_0 = dw2_0 = ()
    else:
      dw1_0 = tuple(load_f32_tile(dw1_in.at[bh, c0 + c]) for c in range(NL))
      dw2_0 = tuple(load_f32_tile(dw2_in.at[bh, c0 + c]) for c in range(NL))
    zero = plgpu.load(gam_s, layout=red0) * 0.0  # (a splat-layout zero cannot be stored)
    dgam_a[...] = zero
    dbet_a[...] = zero

    if C > 1:
      plgpu.barrier_arrive(cbar.at[0])  # peers' barriers set up, xbuf read, before any push
      plgpu.barrier_wait(cbar.at[0])

    def allreduce(x, slot):
      """Sum of the [64, 64] f32 partials over the cluster (identity at cluster 1)."""
      if C == 1 or "X" in ablate:
        return x
      plgpu.async_store_smem(x, xbuf[slot], rbars[slot].at[0], cluster_idx=1 - r,
                             cluster_dim="c")
      plgpu.barrier_wait(rbars[slot].at[0])
      return x + xbuf[slot][...]

    def acc_add(vals, make_pairs):
      """vals[i] + sum of the products make_pairs()[i] (wgmma; in place when compiled)."""
      if interpret is not None:  # no interpret rule for wgmma under run_state
        return tuple(v + d for v, d in zip(vals, wgmma_chains(make_pairs())))

      def fn(accs):
        for acc, pairs in zip(accs, make_pairs()):
          for a, b in pairs:
            plgpu.wgmma(acc, a, b)
      return pl.run_state(fn)(tuple(plgpu.ACC.init(v) for v in vals))

    pending = {}  # lazy_waits: load name -> its barrier, waited before first use (`need`)

    def need(*names):
      for n in names:
        if n in pending:
          plgpu.barrier_wait(bars.at[pending.pop(n)])

    def issue_loads(m, parity):
      g, i = bh * groups + m // G, m % G  # the per-step states of step m: [g, i] and [g, i + 1]
      if config.lazy_waits:  # in the order of first use (see `step`)
        kx2, kg2, kxh, kh, krstd, qx2, dz1, db1q, db2q = saved
        named = (("eta", eta_ref.at[bh, m], eta_s), ("db2q", db2q.at[bh, m], nb2_s),
                 ("db1q", db1q.at[bh, m, pl.ds(c0, NL)], nb1_s),
                 ("qx2", qx2.at[bh, m, pl.ds(c0, NL)], xb_s), ("do", do_ref.at[bh, m], do_s),
                 ("q", q_ref.at[bh, m], q_s), ("dz1", dz1.at[bh, m, pl.ds(c0, NL)], g1_s),
                 ("krstd", krstd.at[g, i], rstd_s), ("k", k_ref.at[bh, m], k_s),
                 ("w1", sw1_ref.at[g, i, pl.ds(c0, NL)], w1_s),
                 ("w2", sw2_ref.at[g, i, pl.ds(c0, NL)], w2_s), ("kg2", kg2.at[g, i], g2_s),
                 ("b1", sb1_ref.at[g, i, pl.ds(c0, NL)], b1_s),
                 ("kx2", kx2.at[g, i, pl.ds(c0, NL)], x_s), ("kxh", kxh.at[g, i], xh_s),
                 ("kh", kh.at[g, i], v_s))
        for j, (name, src, dst) in enumerate(named):
          plgpu.copy_gmem_to_smem(src, dst, bars.at[j])
          pending[name] = j
        return
      copies = ((q_ref.at[bh, m], q_s), (k_ref.at[bh, m], k_s),
                (do_ref.at[bh, m], do_s), (eta_ref.at[bh, m], eta_s),
                (sw1_ref.at[g, i, pl.ds(c0, NL)], w1_s), (sw2_ref.at[g, i, pl.ds(c0, NL)], w2_s),
                (sb1_ref.at[g, i, pl.ds(c0, NL)], b1_s), (sb2_ref.at[g, i], b2_s))
      if QP:  # dZ2b is in do_s; G2, xhat, h into their tiles (h: v_s), rstd; X2b into xb_s,
        # dZ1b into g1_s (both free until U); the queries' bias vectors
        kx2, kg2, kxh, kh, krstd, qx2, dz1, db1q, db2q = saved
        copies += ((kx2.at[g, i, pl.ds(c0, NL)], x_s), (kg2.at[g, i], g2_s),
                   (kxh.at[g, i], xh_s), (kh.at[g, i], v_s), (krstd.at[g, i], rstd_s),
                   (qx2.at[bh, m, pl.ds(c0, NL)], xb_s), (dz1.at[bh, m, pl.ds(c0, NL)], g1_s),
                   (db1q.at[bh, m, pl.ds(c0, NL)], nb1_s), (db2q.at[bh, m], nb2_s))
        copy_in(copies, bars)
        return
      copies += ((v_ref.at[bh, m], v_s),)
      copies += ((sw1_ref.at[g, i + 1, pl.ds(c0, NL)], nw1_s),
                 (sw2_ref.at[g, i + 1, pl.ds(c0, NL)], nw2_s),
                 (sb1_ref.at[g, i + 1, pl.ds(c0, NL)], nb1_s), (sb2_ref.at[g, i + 1], nb2_s))
      if SF:  # X2 chunks of keys and queries; the keys' Z2 into the exchange slot this step
        kx2, kz2, qx2, _ = saved  # does not receive in (see `step`)
        copies += ((kx2.at[g, i, pl.ds(c0, NL)], x_s), (qx2.at[g, i, pl.ds(c0, NL)], xb_s),
                   (kz2.at[g, i], xbuf[1 - parity]))
      copy_in(copies, bars)

    def step(m, parity, carry):
      """Mini-batch m. Exchanges k = 0, 1, 2 use slot (k + parity) % 2: two steps alternate, so
      consecutive exchanges never share a slot (a peer may push the next one before this CTA has
      read the last one). saved_forward: only exchange 2 (slot parity) remains, so steps alternate
      slots; the other slot (1 - parity) stages the saved Z2 tiles: the peer pushes into it next
      only in the next step's exchange, after this CTA's push of this step, which comes later."""
      dW1, dW2 = carry  # NL x [64, 64] f32: cotangents of W1[:, chunk], W2[chunk, :]
      ph = Phases()  # named regions: what a `Profile` times
      ph("load")
      issue_loads(m, parity)
      need("eta")
      E = col(plgpu.load(eta_s, layout=red1))  # eta per row
      gam = row(plgpu.load(gam_s, layout=red0))
      bet = row(plgpu.load(bet_s, layout=red0))

      if QP:  # the keys' LayerNorm-L2 parts came with the loads; the queries' reverse too
        dW1, dW2 = query_contributions(ph, dW1, dW2)
        need("krstd")
        rstd = plgpu.load(rstd_s, layout=red1)
      else:
        rstd = keys_layernorm(ph, parity, gam, bet)
        dW1, dW2 = query_reverse_in_kernel(ph, m, parity, dW1, dW2, gam)
      if "U" not in ablate:
        dW1, dW2 = update_reverse(ph, m, parity, E, gam, rstd, dW1, dW2)
      need(*list(pending))  # (every load waited once per step, whatever was ablated)
      ph.close()
      return dW1, dW2

    mlp = mlp_forward if "R" not in ablate else lambda xs, **_: xs[...].astype(f32)

    def keys_layernorm(ph, parity, gam, bet):
      """R: the keys' Z2 (saved or recomputed from W_m), its LayerNorm-L2 parts G2, xhat, h into
      their bf16 tiles; returns rstd."""
      ph("R_key")
      stage = xbuf[1 - parity]  # saved_forward: Z2 (keys, then queries) arrives here
      if SF:
        z2 = plgpu.layout_cast(stage[...], plgpu.Layout.WGMMA)  # (+ b2 already)
      else:
        z2 = allreduce(mlp(k_s, w1h=w1_s, w2h=w2_s, b1_s=b1_s, x_s=x_s, chunks=NL), parity)
        z2 = z2 + row(plgpu.load(b2_s, layout=red0))
      kf = k_s[...].astype(f32)
      xh, rstd = _ln_stats(z2, ln_eps)
      h = gam * xh + bet - (v_s[...].astype(f32) - kf)  # g = gamma h
      gg = gam * h
      g2 = (F * gg - col(jnp.sum(gg, axis=1)) - xh * col(jnp.sum(gg * xh, axis=1))) * col(rstd / F)
      g2_s[...] = g2.astype(bf16)
      xh_s[...] = xh.astype(bf16)
      v_s[...] = h.astype(bf16)  # V is not needed again
      plgpu.commit_smem()
      return rstd

    def query_contributions(ph, dW1, dW2):
      """query_pass: the output path's part of dW_{m+1} and db, from the loaded tiles (X2b in
      xb_s, dZ2b in do_s, dZ1b in g1_s) and vectors (db1q in nb1_s, db2q in nb2_s)."""
      ph("A_qpass")
      need("db2q", "db1q", "qx2", "do", "q", "dz1")
      db2_a[...] = plgpu.load(db2_a, layout=red0) + plgpu.load(nb2_s, layout=red0)
      for c in range(NL):
        db1_a[c] = plgpu.load(db1_a.at[c], layout=red0) + plgpu.load(nb1_s.at[c], layout=red0)
      d = acc_add(dW2 + dW1, lambda: ([[(xb_s.at[c].T, do_s)] for c in range(NL)]
                                      + [[(q_s.T, g1_s.at[c])] for c in range(NL)]))
      dW2, dW1 = d[:NL], d[NL:]
      for c in range(NL):  # the bf16 cotangents for the update's reverse
        nw1_s[c] = dW1[c].astype(bf16)
        nw2_s[c] = dW2[c].astype(bf16)
      plgpu.commit_smem()
      return dW1, dW2

    def query_reverse_in_kernel(ph, m, parity, dW1, dW2, gam):
      """The output path's reverse (A) of step m: dW_{m+1} += its part; the dQ partial out."""
      ph("R_query")
      stage = xbuf[1 - parity]
      if SF:  # the committed barrier above ordered every thread's read of the keys' Z2
        plgpu.copy_gmem_to_smem(saved[3].at[bh * groups + m // G, m % G], stage, bars.at[0])
        plgpu.barrier_wait(bars.at[0])
        z2b = plgpu.layout_cast(stage[...], plgpu.Layout.WGMMA)
      else:
        z2b = allreduce(mlp(q_s, w1h=nw1_s, w2h=nw2_s, b1_s=nb1_s, x_s=xb_s, chunks=NL),
                        1 - parity)
        z2b = z2b + row(plgpu.load(nb2_s, layout=red0))
      xhb, rstdb = _ln_stats(z2b, ln_eps)

      # ---- A: out = Q + gamma xhb + beta
      ph("A_gsum")  # (finer phases: A_*sum and A_db1 are column sums, cross-warp reductions)
      dof = do_s[...].astype(f32)
      dgam_a[...] = plgpu.load(dgam_a, layout=red0) + sum_c(dof * xhb)
      dbet_a[...] = plgpu.load(dbet_a, layout=red0) + sum_c(dof)
      ph("A_ln")
      dxhb = gam * dof
      dz2b = col(rstdb) * (dxhb - col(mean_f(dxhb)) - xhb * col(mean_f(dxhb * xhb)))
      ph("A_b2sum")
      db2_a[...] = plgpu.load(db2_a, layout=red0) + sum_c(dz2b)
      ph("A_st")
      dz_s[...] = dz2b.astype(bf16)
      plgpu.commit_smem()
      ph("A_dw2")
      if gm:
        d2 = acc_add(tuple(ld_dw(dw2_out, c) for c in range(NL)),
                     lambda: [[(xb_s.at[c].T, dz_s)] for c in range(NL)])
        st_dw(dw2_out, d2)
        d2b = tuple(x.astype(bf16) for x in d2)
      else:
        dW2 = acc_add(dW2, lambda: [[(xb_s.at[c].T, dz_s)] for c in range(NL)])
        d2b = dW2
      for c in range(NL):  # X2b is consumed: its tiles take dZ1b
        ph("A_dz1b_mm")
        z1b, pre = wgmma_multi([(q_s, nw1_s.at[c]), (dz_s, nw2_s.at[c].T)], shp)
        ph("A_dz1b_ew")
        dz1b = pre * _gelu_grad(z1b + row(plgpu.load(nb1_s.at[c], layout=red0)))
        ph("A_db1")
        db1_a[c] = plgpu.load(db1_a.at[c], layout=red0) + sum_c(dz1b)
        ph("A_dz1b_st")
        xb_s[c] = dz1b.astype(bf16)
      plgpu.commit_smem()
      ph("A_dw1")
      if gm:
        d1 = acc_add(tuple(ld_dw(dw1_out, c) for c in range(NL)),
                     lambda: [[(q_s.T, xb_s.at[c])] for c in range(NL)])
        st_dw(dw1_out, d1)
        d1b = tuple(x.astype(bf16) for x in d1)
      else:
        dW1 = acc_add(dW1, lambda: [[(q_s.T, xb_s.at[c])] for c in range(NL)])
        d1b = dW1
      ph("A_dq")
      dq = wgmma_chain([(xb_s.at[c], nw1_s.at[c].T) for c in range(NL)], shp)
      q_s[...] = dq.astype(bf16)  # dQ partial (the caller adds dout)
      for c in range(NL):  # W_{m+1} is consumed: its tiles take the bf16 cotangents
        nw1_s[c] = d1b[c].astype(bf16)
        nw2_s[c] = d2b[c].astype(bf16)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_s, dq_ref.at[bh, r, m])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # q_s is reused below
      return dW1, dW2

    def update_reverse(ph, m, parity, E, gam, rstd, dW1, dW2):
      """U: W1' = W1 - K^T (e G1), W2' = W2 - X2^T (e G2), b' likewise (dW*, db* now final)."""
      ph("U_g1")
      need("k", "w1", "w2", "kg2", "b1")
      db2v = plgpu.load(db2_a, layout=red0)
      de = None
      for c in range(NL):  # ordered for few live [64, 64] values (128 registers are the dW)
        z1, p = wgmma_multi([(k_s, w1_s.at[c]), (g2_s, w2_s.at[c].T)], shp)
        gp, gpp = _gelu_grads(z1 + row(plgpu.load(b1_s.at[c], layout=red0)))
        g1 = p * gp
        g1_s[c] = (-E * g1).astype(bf16)
        pg = p * gpp
        (kdw1,) = wgmma_multi([(k_s, nw1_s.at[c])], shp)
        a1 = kdw1 + row(plgpu.load(db1_a.at[c], layout=red0))
        dec = jnp.sum(g1 * a1, axis=1)
        de = dec if de is None else de + dec
        dg1 = -E * a1
        xb_s[c] = (dg1 * gp).astype(bf16)  # dP
        zp[c][...] = (dg1 * pg).astype(bf16)  # first part of dZ1
      plgpu.commit_smem()
      ph("U_t")
      need("kx2")
      t1, t2 = wgmma_chains([[(x_s.at[c], nw2_s.at[c]) for c in range(NL)],
                             [(xb_s.at[c], w2_s.at[c]) for c in range(NL)]], shp)
      g2f = g2_s[...].astype(f32)
      # deta: -sum G1 (K dW1 + db1) - sum G2 (X2 dW2 + db2); the replicated db2 term split over C
      de = de + jnp.sum(g2f * (t1 + row(db2v * (1.0 / C))), axis=1)
      de_s[...] = -de
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(de_s, de_ref.at[bh, r, m])
      ph("U_xchg")
      dg2 = allreduce(t2 - E * t1, parity) - E * row(db2v)
      ph("U_lnvjp")
      need("kxh", "kh")
      # ---- LayerNorm-L2 gradient G2 = rstd (g - mean g - xh mean(g xh)), g = gamma h: its VJP
      u = dg2 * col(rstd)
      dstd = -jnp.sum(u * g2_s[...].astype(f32), axis=1)
      xh = xh_s[...].astype(f32)
      s_ux = mean_f(u * xh)
      dg = u - col(mean_f(u)) - xh * col(s_ux)
      hh = v_s[...].astype(f32)
      if not fs:
        dgam_a[...] = plgpu.load(dgam_a, layout=red0) + sum_c(dg * (gam * xh + hh))
        dbet_a[...] = plgpu.load(dbet_a, layout=red0) + sum_c(dg * gam)
      gg = gam * hh
      v_s[...] = (-gam * dg).astype(bf16)  # dV = dT (the caller subtracts it from dK)
      dxh = gam * gam * dg - (col(s_ux) * gg + col(mean_f(gg * xh)) * u)
      dz2 = (col(rstd) * (dxh - col(mean_f(dxh)) - xh * col(mean_f(dxh * xh)))
             + col(dstd * (1.0 / F)) * xh)
      if fs:  # dgamma, dbeta, db2: one reduction of [64, 192]
        sums = sum_c(jnp.concatenate([dg * (gam * xh + hh), dg * gam, dz2], axis=1))
        dgam_a[...] = plgpu.load(dgam_a, layout=red0) + sums[:64]
        dbet_a[...] = plgpu.load(dbet_a, layout=red0) + sums[64:128]
        db2_a[...] = db2v + sums[128:]
      else:
        db2_a[...] = db2v + sum_c(dz2)
      dz_s[...] = dz2.astype(bf16)
      xh_s[...] = (-E * g2_s[...].astype(f32)).astype(bf16)  # xh is consumed: -e G2 for dX2
      plgpu.commit_smem()
      on_rank0(lambda: plgpu.copy_smem_to_gmem(v_s, dv_ref.at[bh, m]))
      ph("U_dx2")
      dz1s = []  # fused_sums 2: the chunks' dZ1, summed after the loop
      for c in range(NL):  # dX2 = -e G2 dW2^T + dZ2 W2^T; dZ1 += dX2 gelu'(Z1)
        (z1,) = wgmma_multi([(k_s, w1_s.at[c])], shp)
        gp = _gelu_grad(z1 + row(plgpu.load(b1_s.at[c], layout=red0)))
        dx2 = wgmma_chain([(xh_s, nw2_s.at[c].T), (dz_s, w2_s.at[c].T)], shp)
        dz1 = zp[c][...].astype(f32) + dx2 * gp
        if fs == 2:
          dz1s.append(dz1)
        else:
          db1_a[c] = plgpu.load(db1_a.at[c], layout=red0) + sum_c(dz1)
        zp[c][...] = dz1.astype(bf16)
      if fs == 2:  # db1 of every chunk: one reduction of [64, 64 NL]
        sums = sum_c(jnp.concatenate(dz1s, axis=1))
        for c in range(NL):
          db1_a[c] = plgpu.load(db1_a.at[c], layout=red0) + sums[64 * c:64 * (c + 1)]
      plgpu.commit_smem()
      ph("U_dw")
      if gm:
        st_dw(dw2_out, acc_add(tuple(ld_dw(dw2_out, c) for c in range(NL)),
                               lambda: [[(xb_s.at[c].T, g2_s), (x_s.at[c].T, dz_s)]
                                        for c in range(NL)]))
        st_dw(dw1_out, acc_add(tuple(ld_dw(dw1_out, c) for c in range(NL)),
                               lambda: [[(k_s.T, zp[c])] for c in range(NL)]))
      else:
        dW2 = acc_add(dW2, lambda: [[(xb_s.at[c].T, g2_s), (x_s.at[c].T, dz_s)]
                                    for c in range(NL)])
        dW1 = acc_add(dW1, lambda: [[(k_s.T, zp[c])] for c in range(NL)])
      ph("U_dk")
      dk = wgmma_chain([p for c in range(NL)
                        for p in ((g1_s.at[c], nw1_s.at[c].T), (zp[c], w1_s.at[c].T))], shp)
      k_s[...] = dk.astype(bf16)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_s, dk_ref.at[bh, r, m])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the next step's loads overwrite tiles
      return dW1, dW2

    def two_steps(j, carry):  # mini-batches NS-1-2j, NS-2-2j (G is even: never across groups)
      return step(NS - 2 - 2 * j, 1, step(NS - 1 - 2 * j, 0, carry))

    dW1, dW2 = lax.fori_loop(0, NS // 2, two_steps, (dw1_0, dw2_0))
    plgpu.wait_smem_to_gmem(0)
    if C > 1:
      plgpu.barrier_arrive(cbar.at[0])  # every push into xbuf has landed and been read
      plgpu.barrier_wait(cbar.at[0])
    for dst, vals in ((dw1_out, dW1), (dw2_out, dW2)):
      for c in range(len(vals)):  # (none with dw_gmem: the outputs already hold dW)
        xb0[...] = vals[c]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(xb0, dst.at[bh, c0 + c])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    plgpu.copy_smem_to_gmem(db1_a, db1_out.at[bh, pl.ds(c0, NL)])

    def rank0_vectors():
      plgpu.copy_smem_to_gmem(db2_a, db2_out.at[bh])
      plgpu.copy_smem_to_gmem(dgam_a, dgam_ref.at[bh])
      plgpu.copy_smem_to_gmem(dbet_a, dbet_ref.at[bh])
    on_rank0(rank0_vectors)
    plgpu.wait_smem_to_gmem(0)

  st = lambda *s: jax.ShapeDtypeStruct(s, bf16)
  sf = lambda *s: jax.ShapeDtypeStruct(s, f32)
  out_type = (st(BH, C, NS, 64, 64), st(BH, C, NS, 64, 64), st(BH, NS, 64, 64), sf(BH, C, NS, 64),
              sf(BH, 64), sf(BH, 64), sf(BH, NH, 64, 64), sf(BH, NH, 64), sf(BH, NH, 64, 64),
              sf(BH, 64))
  if QP:  # no dQ partials: `query_reverse` computes dQ
    out_type = out_type[1:]
  vec = lambda *lead: plgpu.SMEM(lead + (64,), f32)
  scratch = [tile(), tile(), tile(), tile(),  # q, k, v, dout (later dQ, dK, h / dV, dZ1 parts)
             tile(NL), tile(NL), tile(NL), tile(NL),  # W1_m, W2_m, W1_{m+1} / dW1, W2_{m+1} / dW2
             tile(NL), tile(NL), tile(NL),  # X2, X2b / dZ1b / dP, -e G1
             tile(), tile(), tile(),  # G2, dZ2b / dZ2, xh / -e G2
             vec(), vec(NL), vec(NL), vec(), vec(), vec(), vec(), vec(),  # eta b1 nb1 b2 nb2 g b de
             vec(NL), vec(), vec(), vec(),  # db1, db2, dgamma, dbeta accumulators
             *[plgpu.SMEM(shp, f32, transforms=tr32) for _ in range(2)],  # exchange / staging
             plgpu.Barrier(num_barriers=17 if QP else 16 if SF else 13)]
  kwargs = {}
  if C > 1:
    scratch += [*[plgpu.Barrier(num_arrivals=C - 1, num_barriers=1) for _ in range(2)],
                plgpu.ClusterBarrier(collective_axes=("c",), num_barriers=1)]
    kwargs.update(cluster=(C,), cluster_names=("c",))
  else:
    scratch += [tile(NL - 2)]
  if QP:
    scratch.append(vec())  # rstd (kept last: see body_)
  if parts:
    return KernelParts(body, out_type, scratch, kwargs, config.approx_math,
                       config.scratch_bytes)
  return per_head_kernel(body, out_type=out_type, scratch=scratch, BH=BH,
                         approx_math=config.approx_math, interpret=interpret, profile=profile,
                         reduction_scratch=config.scratch_bytes,
                         **kwargs)


def main(argv=None) -> dict[str, float]:
  """Times the backward kernel's `ttt_mlp_pallas(backward=...)` paths against jax.grad of the float32 XLA scan (`kernel_bench.backward_main`):
  `python -m pallas_kernels.ttt_mlp.kernel_bwd_mgpu [--nc N] [--variants V,...] [--interpret]`."""
  from pallas_kernels import kernel_bench
  variants = ("pallas_qpass", "pallas_saved", "pallas", "pallas_dw_gmem")
  return kernel_bench.backward_main(argv, main.__doc__, variants, ("pallas_qpass",), layer="mlp")


if __name__ == "__main__":
  main()
