"""TTT-Linear backward over one checkpoint group as a Mosaic GPU kernel (the scan in reverse).

The caller (`ttt_linear._bwd_pallas`) first re-runs the forward kernel over the group from its
checkpoint with a checkpoint every mini-batch, which gives the float32 state before every step m
(W_m, b_m; W_{m+1}, b_{m+1} is the state after it). This kernel then walks the group's G steps from
the last to the first, one warpgroup per (b, h), with the state cotangent dW (float32 [64, 64]) as
a wgmma accumulator carried through the loop and db, dgamma, dbeta as float32 vectors in SMEM.
Per step m (forward: Z = K W + b, G = LN-L2 gradient of Z against T = V - K, W' = W - K^T (e G),
b' = b - e^T G, Zb = Q W' + b', out = Q + gamma LN(Zb) + beta):
  R  recompute Z = K W + b and Zb = Q W' + b' (one wgmma group), LayerNorm statistics, G;
  A  the query path: dZb = LN'(gamma dout), dW' += Q^T dZb, db' += sum dZb, dQ = dout + dZb W'^T;
  U  the update: a = K dW' + db', dG = -e a, de = -sum_f G a, the LN-L2 gradient's VJP
     (dgamma, dbeta, dT, dZ), dW = dW' + K^T dZ, db = db' + sum dZ,
     dK = -(e G) dW'^T + dZ W^T - dT, dV = dT.
Matmul operands are bf16 (the forward kernel's operand rounding: W_m as bf16 is exactly the copy
the forward used), accumulation and elementwise math float32. Interpret mode (CPU tests) adds the
update products from a fresh accumulator (no rule for wgmma under `run_state`).
`python -m pallas_kernels.ttt_linear.kernel_bwd_mgpu` times it against jax.grad of the float32 XLA scan (`kernel_bench`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mgpu_common import DEFAULT_REDUCTION_SCRATCH, copy_in, per_head_kernel
from pallas_kernels.ttt_linear.kernel_mgpu import F, _col, _ln, _row, mm_group


@dataclasses.dataclass(frozen=True)
class BwdTuningConfig:
  """Frozen backward-kernel configuration (validated for F = CS = 64 in interpret mode and by the
  CUDA lowering only: not yet run on a GPU)."""

  approx_math: bool = True  # rsqrt.approx etc. (Mosaic GPU approx_math)
  # SMEM bytes for the six column sums per step (cross-warp reductions; 2 KiB: 4 rounds of 2
  # warpgroup barriers each, 8 KiB: one; bitwise the same)
  reduction_scratch: int = DEFAULT_REDUCTION_SCRATCH


def mm_chain(pairs, shape=(64, 64)):
  """sum_i a_i @ b_i accumulated on the tensor cores, one wait (inside a kernel)."""
  def fn(acc):
    for a, b in pairs:
      plgpu.wgmma(acc, a, b)
    return acc[...]
  return pl.run_scoped(fn, plgpu.ACC(shape, jnp.float32))


def build_backward(BH: int, G: int, ln_eps: float, *,
                   config: BwdTuningConfig = BwdTuningConfig(), interpret=None):
  """Returns the group-backward kernel f(...), G mini-batches walked from the last to the first.

  Arguments (NS >= G + 1 mini-batches of inputs are passed; the first G are used):
    q, k, v [BH, NS, 64, 64] bf16     eta [BH, NS, 64] f32     dout [BH, G, 64, 64] bf16
    gamma, beta [BH, 64] f32
    sw [BH, G + 1, 64, 64] f32, sb [BH, G + 1, 64] f32: the state before step m = 0..G
    dw [BH, 64, 64] f32, db [BH, 64] f32: cotangent of the state after the group
  Results:
    dq, dk, dv [BH, G, 64, 64] f32     deta [BH, G, 64] f32
    dgamma, dbeta [BH, 64] f32 (this group's contribution)
    dw [BH, 64, 64] f32, db [BH, 64] f32: cotangent of the state before the group
  """
  bf16, f32 = jnp.bfloat16, jnp.float32
  shp = (64, 64)
  tr = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  tr32 = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))
  tile = lambda: plgpu.SMEM(shp, bf16, transforms=tr)
  tile32 = lambda: plgpu.SMEM(shp, f32, transforms=tr32)
  vec = lambda: plgpu.SMEM((64,), f32)
  red0 = plgpu.Layout.WGMMA.reduce(0)  # [64] over columns (a column sum's result)
  red1 = plgpu.Layout.WGMMA.reduce(1)  # [64] over rows
  mean_f = lambda x: jnp.mean(x, axis=1)
  sum_r = lambda x: jnp.sum(x, axis=0)

  def body(q_ref, k_ref, v_ref, eta_ref, do_ref, g_ref, bt_ref, sw_ref, sb_ref, dw_in, db_in,
           dq_ref, dk_ref, dv_ref, de_ref, dgam_ref, dbet_ref, dw_out, db_out,
           q_s, k_s, v_s, do_s, w_s, nw_s, dzb_s, dw_s, eg_s, dz_s, wa32, wb32, wc32,
           eta_s, b_s, nb_s, gam_s, bet_s, de_s, db_a, dgam_a, dbet_a, bars):
    bh = lax.axis_index("bh")
    copy_in(((dw_in.at[bh], wa32), (db_in.at[bh], db_a), (g_ref.at[bh], gam_s),
             (bt_ref.at[bh], bet_s)), bars)
    dW0 = plgpu.layout_cast(wa32[...], plgpu.Layout.WGMMA)
    zero = plgpu.load(gam_s, layout=red0) * 0.0  # (a splat-layout zero cannot be stored)
    dgam_a[...] = zero
    dbet_a[...] = zero

    def acc_add(val, pairs):
      """val + sum of the products (wgmma; accumulated in place when compiled)."""
      if interpret is not None:  # no interpret rule for wgmma under run_state
        return val + mm_chain(pairs())

      def fn(acc):
        for a, b in pairs():
          plgpu.wgmma(acc, a, b)
      return pl.run_state(fn)(plgpu.ACC.init(val))

    def step(j, dW):
      m = G - 1 - j
      copies = ((q_ref.at[bh, m], q_s), (k_ref.at[bh, m], k_s), (v_ref.at[bh, m], v_s),
                (do_ref.at[bh, m], do_s), (eta_ref.at[bh, m], eta_s), (sw_ref.at[bh, m], wa32),
                (sw_ref.at[bh, m + 1], wb32), (sb_ref.at[bh, m], b_s),
                (sb_ref.at[bh, m + 1], nb_s))
      copy_in(copies, bars)
      E = _col(plgpu.load(eta_s, layout=red1))  # eta per row
      gam = _row(plgpu.load(gam_s, layout=red0))
      bet = _row(plgpu.load(bet_s, layout=red0))
      w_s[...] = plgpu.layout_cast(wa32[...], plgpu.Layout.WGMMA).astype(bf16)  # W_m
      nw_s[...] = plgpu.layout_cast(wb32[...], plgpu.Layout.WGMMA).astype(bf16)  # W_{m+1}
      plgpu.commit_smem()

      # ---- R: the step's forward
      z, zb = mm_group([(k_s, w_s), (q_s, nw_s)])
      z = z + _row(plgpu.load(b_s, layout=red0))
      zb = zb + _row(plgpu.load(nb_s, layout=red0))
      kf = k_s[...].astype(f32)
      xh, rstd = _ln(z, ln_eps)
      h = gam * xh + bet - (v_s[...].astype(f32) - kf)
      gg = gam * h
      g = (gg - _col(mean_f(gg)) - xh * _col(mean_f(gg * xh))) * _col(rstd)  # G
      eg_s[...] = (-E * g).astype(bf16)
      xhb, rstdb = _ln(zb, ln_eps)

      # ---- A: out = Q + gamma xhb + beta
      dof = do_s[...].astype(f32)
      dgam_a[...] = plgpu.load(dgam_a, layout=red0) + sum_r(dof * xhb)
      dbet_a[...] = plgpu.load(dbet_a, layout=red0) + sum_r(dof)
      dxhb = gam * dof
      dzb = _col(rstdb) * (dxhb - _col(mean_f(dxhb)) - xhb * _col(mean_f(dxhb * xhb)))
      dbn = plgpu.load(db_a, layout=red0) + sum_r(dzb)  # cotangent of b' (total)
      dzb_s[...] = dzb.astype(bf16)
      plgpu.commit_smem()
      dW = acc_add(dW, lambda: [(q_s.T, dzb_s)])  # cotangent of W' (total)
      (dqp,) = mm_group([(dzb_s, nw_s.T)])
      wa32[...] = dof + dqp  # dQ
      dw_s[...] = dW.astype(bf16)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(wa32, dq_ref.at[bh, m])

      # ---- U: W' = W - K^T (e G), b' = b - e^T G
      (kdw,) = mm_group([(k_s, dw_s)])
      a1 = kdw + _row(dbn)
      de_s[...] = -jnp.sum(g * a1, axis=1)
      u = -E * a1 * _col(rstd)  # dG * rstd
      dstd = -jnp.sum(u * g, axis=1)
      s_ux = mean_f(u * xh)
      dgg = u - _col(mean_f(u)) - xh * _col(s_ux)
      dgam_a[...] = plgpu.load(dgam_a, layout=red0) + sum_r(dgg * (gam * xh + h))
      dbet_a[...] = plgpu.load(dbet_a, layout=red0) + sum_r(dgg * gam)
      dt = -gam * dgg  # dT = dV
      dxh = gam * gam * dgg - (_col(s_ux) * gg + _col(mean_f(gg * xh)) * u)
      dz = (_col(rstd) * (dxh - _col(mean_f(dxh)) - xh * _col(mean_f(dxh * xh)))
            + _col(dstd * (1.0 / F)) * xh)
      db_a[...] = dbn + sum_r(dz)
      dz_s[...] = dz.astype(bf16)
      wc32[...] = dt
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(wc32, dv_ref.at[bh, m])
      plgpu.copy_smem_to_gmem(de_s, de_ref.at[bh, m])
      dW = acc_add(dW, lambda: [(k_s.T, dz_s)])
      dkp = mm_chain([(eg_s, dw_s.T), (dz_s, w_s.T)])
      wb32[...] = dkp - dt  # dK
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(wb32, dk_ref.at[bh, m])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the next step's loads overwrite tiles
      return dW

    dW = lax.fori_loop(0, G, step, dW0)
    wa32[...] = dW
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(wa32, dw_out.at[bh])
    plgpu.copy_smem_to_gmem(db_a, db_out.at[bh])
    plgpu.copy_smem_to_gmem(dgam_a, dgam_ref.at[bh])
    plgpu.copy_smem_to_gmem(dbet_a, dbet_ref.at[bh])
    plgpu.wait_smem_to_gmem(0)

  sf = lambda *s: jax.ShapeDtypeStruct(s, f32)
  out_type = (sf(BH, G, 64, 64), sf(BH, G, 64, 64), sf(BH, G, 64, 64), sf(BH, G, 64),
              sf(BH, 64), sf(BH, 64), sf(BH, 64, 64), sf(BH, 64))
  scratch = [tile(), tile(), tile(), tile(),  # q, k, v, dout
             tile(), tile(), tile(), tile(), tile(), tile(),  # W_m, W_{m+1}, dZb, dW', -e G, dZ
             tile32(), tile32(), tile32(),  # W_m / dQ, W_{m+1} / dK, dV (f32 staging)
             vec(), vec(), vec(), vec(), vec(), vec(),  # eta, b_m, b_{m+1}, gamma, beta, deta
             vec(), vec(), vec(),  # db, dgamma, dbeta accumulators
             plgpu.Barrier(num_barriers=9)]
  return per_head_kernel(body, out_type=out_type, scratch=scratch, BH=BH,
                         approx_math=config.approx_math, interpret=interpret,
                         reduction_scratch=config.reduction_scratch)


def main(argv=None) -> dict[str, float]:
  """Times the TTT-Linear backward kernel against jax.grad of the float32 XLA scan (`kernel_bench.backward_main`):
  `python -m pallas_kernels.ttt_linear.kernel_bwd_mgpu [--nc N] [--variants V,...] [--interpret]`."""
  from pallas_kernels import kernel_bench
  variants = ("pallas",)
  return kernel_bench.backward_main(argv, main.__doc__, variants, None, layer="linear")


if __name__ == "__main__":
  main()
