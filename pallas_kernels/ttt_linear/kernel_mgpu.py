"""TTT-Linear forward scan as one Mosaic GPU kernel: one warpgroup per (b, h), state in registers.

The inner model is f(x) = x W1 + b1 with W1 [F, F] = [64, 64]. Its float32 state is one wgmma
accumulator (32 registers per thread in one warpgroup) carried through the mini-batch `fori_loop`
for the whole scan; b1 [64] float32 lives in SMEM. Per mini-batch m (spec §3.4, primal form,
"update then apply"):
  (1) Z1 = K W1 + b1                                   (wgmma, bf16 operands, f32 accumulate)
  (2) G1 = d/dZ1 1/2 ||LN(Z1) - (V - K)||^2            (fused LayerNorm-L2 backward, f32)
  (3) W1 += (-diag(eta) K)^T G1  (wgmma into the carried accumulator), b1 -= eta^T G1
  (4) out = Q + LN(Q W1' + b1')                        (wgmma with the bf16 copy of the new W1)
`dual_form=True` runs (4) as in the official dual form instead: Q W1 (old state) and A = Q K^T are
issued together with (1), and Z1_bar = Q W1 - (eta_row * A) G1 + b1' is formed after (2) with one
wgmma issued together with the update: one dependent wgmma round trip fewer per mini-batch, at the
cost of two more 64x64x64 products.
Checkpoints (W1, b1 float32, the state before mini-batch g * group) go to HBM by TMA.

Interpret mode (CPU tests) has no rule for wgmma under `run_state`: there the update goes to a fresh
accumulator and is added; the in-place accumulation is covered by the CUDA lowering test and the GPU
benchmark only.
`python -m pallas_kernels.ttt_linear.kernel_mgpu` times it against the float32 XLA scan (`kernel_bench`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mgpu_common import DEFAULT_REDUCTION_SCRATCH, copy_in, per_head_kernel

CS = 64  # mini-batch size the kernel is built for
F = 64  # head dim


@dataclasses.dataclass(frozen=True)
class LinearTuningConfig:
  """Frozen forward configuration (validated for F = CS = 64; H100 timings in
  benchmarks/NOTES-ttt-linear.md)."""

  dual_form: bool = False  # (4) as the official dual form (see the module docstring)
  prefetch: bool = False  # double-buffer Q/K/V/eta: mini-batch m+1's TMA under step m
  approx_math: bool = True  # rsqrt.approx etc. (Mosaic GPU approx_math)
  # The trajectory's Z1 = K W1 as K W1h + K W1l (W1 as its bf16 (hi, lo) pair: one more 64x64x64
  # product in the same wait): float32-accurate where the bf16 W1 perturbs a long scan's gradients
  # (NOTES-ttt-linear.md, "split_state"); the output path's Q W1 stays bf16.
  split_state: bool = False
  # SMEM bytes for b1's column sum (a cross-warp reduction: 1 KiB per 8 columns and round; the
  # default 2 KiB takes 4 rounds of 2 warpgroup barriers, 8 KiB one; bitwise the same)
  reduction_scratch: int = DEFAULT_REDUCTION_SCRATCH


def _row(vec, shape=(64, 64)):
  """[64] vector over columns -> [64, 64] (same value down each column)."""
  return lax.broadcast_in_dim(vec, shape, [1])


def _col(vec, shape=(64, 64)):
  """[64] vector over rows -> [64, 64] (same value along each row)."""
  return lax.broadcast_in_dim(vec, shape, [0])


def _ln(z, eps):
  """Row LayerNorm without affine: (x_hat [64, 64], rstd [64])."""
  mu = jnp.mean(z, axis=1)
  d = z - _col(mu)
  rstd = lax.rsqrt(jnp.mean(d * d, axis=1) + eps)
  return d * _col(rstd), rstd


def _ln_l2_grad(z, target, gam, bet, eps):
  """d/dz of 1/2 ||gamma x_hat + beta - target||^2 per row; gam, bet already [64, 64]."""
  xh, rstd = _ln(z, eps)
  gg = gam * (gam * xh + bet - target)
  s1 = jnp.sum(gg, axis=1)
  s2 = jnp.sum(gg * xh, axis=1)
  return (F * gg - _col(s1) - xh * _col(s2)) * _col(rstd * (1.0 / F))


def mm_group(pairs, shape=(64, 64)):
  """Independent a @ b products issued together, one wait: tuple of f32 values (inside a kernel).
  An entry that is a list of (a, b) pairs is their sum, accumulated in one accumulator."""
  chains = [p if isinstance(p, list) else [p] for p in pairs]
  def fn(*accs):
    for acc, chain in zip(accs, chains):
      for a, b in chain:
        plgpu.wgmma(acc, a, b)
    return tuple(acc[...] for acc in accs)
  return pl.run_scoped(fn, *[plgpu.ACC(shape, jnp.float32) for _ in chains])


def build_forward(BH: int, NC: int, group: int, ln_eps: float, *,
                  config: LinearTuningConfig = LinearTuningConfig(), interpret=None):
  """Returns f(q, k, v, eta, gamma, beta, w1, b1) -> (out, ckpt_w1, ckpt_b1).

  q, k, v: [BH, NC, 64, 64] bf16     eta: [BH, NC, 64] f32     gamma, beta: [BH, 64] f32
  w1: [BH, 64, 64] f32 (initial W1 [F_in, F_out])     b1: [BH, 64] f32
  out: [BH, NC, 64, 64] bf16
  ckpt_w1: [BH, NG, 64, 64] f32, ckpt_b1: [BH, NG, 64] f32: the state before mini-batch g * group,
  NG = ceil(NC / group).
  """
  NG = -(-NC // group)
  NB = 2 if config.prefetch else 1
  bf16, f32 = jnp.bfloat16, jnp.float32
  shp = (64, 64)
  tr = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  tr32 = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))
  tile = lambda *lead: plgpu.SMEM(lead + shp, bf16, transforms=tr)
  red0 = plgpu.Layout.WGMMA.reduce(0)  # [64] over columns
  red1 = plgpu.Layout.WGMMA.reduce(1)  # [64] over rows
  dual = config.dual_form

  def body(q_ref, k_ref, v_ref, eta_ref, g_ref, bt_ref, w1_ref, b1_ref, o_ref, cw1, cb1,
           q_sb, k_sb, v_sb, eta_sb, ek_s, g1_s, w1h, ea_s, w1l, w32, b1_s, gam_s, bet_s, bars):
    bh = lax.axis_index("bh")
    copy_in(((w1_ref.at[bh], w32), (b1_ref.at[bh], b1_s), (g_ref.at[bh], gam_s),
             (bt_ref.at[bh], bet_s)), bars)
    w1_0 = plgpu.layout_cast(w32[...], plgpu.Layout.WGMMA)

    def store_state(w1):
      """W1's bf16 copy (and with split_state its lo half) for the next products."""
      hi = w1.astype(bf16)
      w1h[...] = hi
      if config.split_state:
        w1l[...] = (w1 - hi.astype(f32)).astype(bf16)

    store_state(w1_0)
    plgpu.commit_smem()

    def update(w1):
      """W1 + (-diag(eta) K)^T G1 (operands in SMEM)."""
      if interpret is not None:  # no interpret rule for wgmma under run_state
        (d,) = mm_group([(ek_s.T, g1_s)])
        return w1 + d

      def fn(acc):
        plgpu.wgmma(acc, ek_s.T, g1_s)
      return pl.run_state(fn)(plgpu.ACC.init(w1))

    def write_checkpoint(gi, w1):
      w32[...] = w1
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(w32, cw1.at[bh, gi])
      plgpu.copy_smem_to_gmem(b1_s, cb1.at[bh, gi])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    def issue_loads(m, slot):
      for i, (src, dst) in enumerate(((q_ref, q_sb), (k_ref, k_sb), (v_ref, v_sb),
                                      (eta_ref, eta_sb))):
        plgpu.copy_gmem_to_smem(src.at[bh, m], dst.at[slot], bars.at[4 * slot + i])

    def step(m, w1):  # w1: [64, 64] f32 accumulator value, the state before mini-batch m
      slot = m % NB if NB > 1 else 0
      q_s, k_s, v_s, eta_s = (b.at[slot] for b in (q_sb, k_sb, v_sb, eta_sb))

      @pl.when(m % group == 0)
      def _():
        write_checkpoint(m // group, w1)

      if NB == 1:
        issue_loads(m, 0)
      else:  # the other slot was last read by step m - 1 (its output TMA already waited)
        @pl.when(m + 1 < NC)
        def _():
          issue_loads(m + 1, 1 - slot)
      for i in range(4):
        plgpu.barrier_wait(bars.at[4 * slot + i])

      eta_c = plgpu.load(eta_s, layout=red1)  # [64] over rows j
      gam = _row(plgpu.load(gam_s, layout=red0))
      bet = _row(plgpu.load(bet_s, layout=red0))
      b1v = plgpu.load(b1_s, layout=red0)
      E = _col(eta_c)
      kf = k_s[...].astype(f32)
      ek_s[...] = (-E * kf).astype(bf16)  # -diag(eta) K

      # (1) Z1 = K W1 + b1 [64, 64] (dual form: also Q W1 and A = Q K^T, same wait)
      kw1 = [(k_s, w1h), (k_s, w1l)] if config.split_state else (k_s, w1h)
      if dual:
        z1, qw, a1 = mm_group([kw1, (q_s, w1h), (q_s, k_s.T)])
      else:
        (z1,) = mm_group([kw1])
      z1 = z1 + _row(b1v)
      # (2) G1 [64, 64]
      g1 = _ln_l2_grad(z1, v_s[...].astype(f32) - kf, gam, bet, ln_eps)
      g1_s[...] = g1.astype(bf16)
      b1n = b1v - jnp.sum(E * g1, axis=0)  # [64] over columns
      b1_s[...] = b1n
      if dual:  # -(eta_row * A): row i, column j scaled by eta_j (causal-free within the batch)
        ea_s[...] = (-_row(plgpu.load(eta_s, layout=red0)) * a1).astype(bf16)
      plgpu.commit_smem()
      # (3) W1 += (-eta K)^T G1 (into the carried accumulator)
      if dual:
        (pa,) = mm_group([(ea_s, g1_s)])
        w1 = update(w1)
        z1b = qw + pa + _row(b1n)
        store_state(w1)
      else:
        w1 = update(w1)
        store_state(w1)
        plgpu.commit_smem()
        # (4) Z1_bar = Q W1' + b1'
        (z1b,) = mm_group([(q_s, w1h)])
        z1b = z1b + _row(b1n)
      xhb, _ = _ln(z1b, ln_eps)
      out = q_s[...].astype(f32) + gam * xhb + bet
      q_s[...] = out.astype(bf16)  # q_s doubles as the output tile
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_s, o_ref.at[bh, m])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      return w1

    if NB > 1:
      issue_loads(0, 0)
    lax.fori_loop(0, NC, step, w1_0)
    plgpu.wait_smem_to_gmem(0)

  out_type = (jax.ShapeDtypeStruct((BH, NC, CS, F), bf16),
              jax.ShapeDtypeStruct((BH, NG, F, F), f32),
              jax.ShapeDtypeStruct((BH, NG, F), f32))
  scratch = [tile(NB), tile(NB), tile(NB), plgpu.SMEM((NB, 64), f32),  # q, k, v, eta
             tile(), tile(), tile(), tile(),  # -eta K, G1, W1 bf16, -(eta_row * A) (dual form)
             tile(),  # W1's lo half (split_state)
             plgpu.SMEM(shp, f32, transforms=tr32),  # W1 f32 staging (init / checkpoints)
             plgpu.SMEM((64,), f32), plgpu.SMEM((64,), f32), plgpu.SMEM((64,), f32),  # b1 g b
             plgpu.Barrier(num_barriers=4 * NB)]
  return per_head_kernel(body, out_type=out_type, scratch=scratch, BH=BH,
                         approx_math=config.approx_math, interpret=interpret,
                         reduction_scratch=config.reduction_scratch)


def main(argv=None) -> dict[str, float]:
  """Times the TTT-Linear forward configurations against the float32 XLA scan (`kernel_bench.forward_main`):
  `python -m pallas_kernels.ttt_linear.kernel_mgpu [--nc N] [--variants V,...] [--interpret]`."""
  from pallas_kernels import kernel_bench
  variants = ("primal", "dual", "primal_prefetch", "dual_prefetch", "primal_prefetch_split",
              "dual_prefetch_split")
  return kernel_bench.forward_main(argv, main.__doc__, variants, ("primal_prefetch_split",), layer="linear")


if __name__ == "__main__":
  main()
