"""TTT-MLP forward scan, v3: the float32 state lives in wgmma accumulators (registers).

Differences from v1/v2 (`kernel_mgpu.py`, state as bf16 (hi, lo) pairs in SMEM):
- W1 = [W1_c] and W2 = [W2_c] (hidden chunks of 64) are float32 [64, 64] values carried through
  the mini-batch `fori_loop`; the update W_c += (-diag(eta) X)^T G is one wgmma accumulating into
  the carried accumulator (`pl.run_state(...)(plgpu.ACC.init(W_c))`), the sign folded into the
  SMEM operand. A bf16 copy of the new state is stored to SMEM as the next matmuls' operand.
  No (hi, lo) read-modify-write per mini-batch: (hi, lo) is formed only for the checkpoints.
- The hidden dimension is sharded over a thread-block cluster of `cluster` CTAs (hidden 256 /
  cluster per CTA): the state does not fit one warpgroup's registers (8 x 32 registers per thread
  at cluster 1). Z2 (keys) and Z2_bar (queries) are partial sums over the hidden shards, all-reduced
  by pushing the [64, 64] float32 partial into the peer's SMEM (`async_store_smem`) and adding
  locally (a + b in the same order on both CTAs: both get bitwise equal sums, so the replicated
  LayerNorm/G2/b2 math stays identical). cluster=1 is the same arithmetic without the exchange:
  the variant the CPU interpret-mode tests run (registers are no constraint there).
Checkpoints keep v1/v2's layout: (hi, lo) bf16 pairs per chunk, b1/b2 float32.
Options (AccTuningConfig): `pipeline` (v4, the default of `ttt_mlp_pallas`: mini-batch m-1's query
half inside step m, which uses the same state), `early_gelu_grad` (v5: v4 with gelu'(K W1 + b1)
kept from the forward half, so the gradient phase has no Z1 recompute), `prefetch_next` (v4p:
v4 with the next step's inputs loaded during the update), `late_bias_sums` (v4l: b1's column sums
under the update's wgmmas), `three_pass` (v3_3pass: the state
trajectory's matmuls as 3-pass bf16 (hi, lo) products, float32-accurate), `outputs=False` (states
only, for the backward's restarts), `save_activations` (the restarts of backward="pallas_saved":
also the per-step X2 and Z2 of keys and queries), `save_ln` (the restarts of the default
backward="pallas_qpass": the keys' X2 and LayerNorm-L2 parts G2, xhat, h, rstd), `checkpoint_lo`
(False for the restarts: per-step states without their lo halves), `precise_update`, `prefetch`,
`approx_math`, `reduction_scratch`, `final_checkpoint` (the restarts: the state after the last step
as one more checkpoint).

Covered only by the GPU run (benchmarks/ttt_mlp_kernel.py): cluster=2 (the DSMEM exchange and its
barriers) and the in-place accumulation into the carried state (interpret mode has no rule for
wgmma under `run_state`, so there the update goes to a fresh accumulator and is added). On CPU,
cluster=1 runs in interpret mode and cluster=2 is lowered for CUDA (tests/pallas_kernels).
`python -m pallas_kernels.ttt_mlp.kernel_acc_mgpu` times it against the float32 XLA scan (`kernel_bench`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mgpu_common import (DEFAULT_REDUCTION_SCRATCH, KernelParts, Phases, Profile,
                                        check_cluster, copy_in, pair_exchange, per_head_kernel)
from pallas_kernels.ttt_mlp.kernel_mgpu import (CS, F, NH, _col_bcast, _gelu, _gelu_and_grad,
                                                _ln_l2_grad, _ln_l2_parts, _ln_stats, _row_bcast,
                                                mlp_forward, wgmma_chain, wgmma_chains,
                                                wgmma_multi)


@dataclasses.dataclass(frozen=True)
class AccTuningConfig:
  """Frozen v3 configuration (validated for F = CS = 64, hidden 256)."""

  cluster: int = 2  # CTAs per head; hidden 256 / cluster per CTA
  prefetch: bool = False  # double-buffer Q/K/V/eta (measured 4% slower on H100: off)
  # Update operands as bf16 (hi, lo) pairs: W1_c += K^T (eG1_hi + eG1_lo), W2_c += X2_hi^T eG2_hi
  # + X2_lo^T eG2_hi + X2_hi^T eG2_lo (eG = -diag(eta) G), instead of one bf16 x bf16 product.
  precise_update: bool = False
  approx_math: bool = True  # tanh.approx etc. in GELU / LayerNorm (Mosaic GPU approx_math)
  # SMEM bytes for column sums' cross-warp reductions (`mgpu_common.DEFAULT_REDUCTION_SCRATCH`)
  reduction_scratch: int = DEFAULT_REDUCTION_SCRATCH
  # v4: mini-batch m-1's query path runs inside step m, with the same state W_m as step m's key
  # path: their Z1/Z2 matmuls share waits, and the queries' exchange and LayerNorm overlap the
  # keys' gradients and the update's wgmmas (one forward half fewer on the step's latency chain).
  pipeline: bool = False
  # False: no query half at all (the output array is left unwritten): for the backward's per-group
  # restarts, which only need the per-step states (checkpoints).
  outputs: bool = True
  # Every matmul on the state trajectory (keys' Z1, Z2, G2 W2^T, the update) as 2-3 bf16 wgmmas
  # of (hi, lo) operand pairs (hi*hi + hi*lo + lo*hi, ~16 mantissa bits) instead of one bf16 x
  # bf16 product; the state's lo half stays in SMEM. The queries' half stays bf16 (outputs only).
  # For the eta ~1e-5 regime where bf16 operands move the gradients by 2e-2 (NOTES-ttt-mlp.md).
  three_pass: bool = False
  # The updates' products into fresh accumulators, added in float32 (W1's, then W2's): not
  # truncated against the carried state's exponent (`kernel_ws_mgpu.WsTuningConfig.fresh_update`).
  fresh_update: bool = False
  # v5 (with pipeline only): the keys' gelu'(Z1_c) is computed with gelu(Z1_c) (one tanh) in the
  # forward half and kept as a bf16 SMEM tile; the gradient phase then only issues G2 W2_c^T (both
  # chunks, one wait) instead of recomputing Z1_c = K W1_c and its tanh. gelu' is rounded to bf16
  # before G1 = (G2 W2^T) * gelu' (G1 is a bf16 update operand anyway): outputs move at bf16 level.
  early_gelu_grad: bool = False
  # For the backward's restarts (v3 path only): per step, also write the key and query halves'
  # forward activations the backward kernel would otherwise recompute: X2 chunks (bf16, the
  # bf16 values the matmuls used) and Z2 (float32, all-reduced, + b2) of the keys and the queries
  # (with outputs=False: of the keys only, for backward="pallas_qpass").
  save_activations: bool = False
  # False (the backward's restarts: the backward kernel reads only the bf16 hi of each per-step
  # state): checkpoints without their lo halves (those outputs are left unwritten).
  checkpoint_lo: bool = True
  # With save_activations and outputs=False (backward="pallas_qpass"'s restarts): instead of the
  # keys' Z2 (f32), the LayerNorm-L2 parts the backward kernel would derive from it: G2, xhat,
  # h = gamma xhat + beta - (V - K) as bf16 tiles (the roundings the backward kernel used) and
  # rstd (f32 [64]), so its step starts without a LayerNorm.
  save_ln: bool = False
  # v4p (with pipeline only): step m+1's K, V, eta are loaded by TMA while step m's update runs
  # (their single buffers are dead by then) and Q_{m+1} once step m's output has left its buffer,
  # so a step starts with its inputs in SMEM instead of a synchronous load round trip. No extra
  # SMEM (unlike `prefetch`, whose double buffers and per-step slot choice made v3 slower).
  prefetch_next: bool = False
  # v4l (with pipeline only): b1_c -= sum_j eta_j G1_c[j, :] runs inside the update (after its
  # wgmmas are issued and the previous queries' output), from the bf16 G1 tiles the update reads,
  # instead of two cross-warp column sums of the float32 G1 in the "g1" phase.
  late_bias_sums: bool = False
  # The backward's restarts: after the last mini-batch one more checkpoint, the state after it
  # (checkpoint index NC // group; NC must be a multiple of group), so a restart over a group's G
  # steps gives all G + 1 states its backward reads without running a (G + 1)-th step.
  final_checkpoint: bool = False

  def __post_init__(self):
    check_cluster(self.cluster)
    if self.final_checkpoint and self.pipeline:
      raise ValueError("final_checkpoint=True is built only on the plain v3 step (no pipeline)")
    if self.three_pass and (self.prefetch or self.precise_update or self.pipeline):
      raise ValueError("three_pass=True is built without prefetch, precise_update and pipeline")
    if self.pipeline and (self.prefetch or self.precise_update or not self.outputs):
      raise ValueError("pipeline=True is built without prefetch, precise_update and outputs=False; "
                       f"got prefetch={self.prefetch}, precise_update={self.precise_update}, "
                       f"outputs={self.outputs}")
    if self.save_activations and (self.pipeline or self.three_pass or self.prefetch
                                  or self.precise_update):
      raise ValueError("save_activations=True is built only on the plain v3 step (no pipeline, "
                       "three_pass, prefetch, precise_update)")
    if self.save_ln and (not self.save_activations or self.outputs):
      raise ValueError("save_ln=True is built with save_activations=True and outputs=False; got "
                       f"save_activations={self.save_activations}, outputs={self.outputs}")
    if self.prefetch_next and not self.pipeline:
      raise ValueError("prefetch_next=True is built only with pipeline=True (step_pipelined); "
                       f"got pipeline={self.pipeline}")
    if self.late_bias_sums and not self.pipeline:
      raise ValueError("late_bias_sums=True is built only with pipeline=True (step_pipelined); "
                       f"got pipeline={self.pipeline}")
    if self.early_gelu_grad and not self.pipeline:
      raise ValueError("early_gelu_grad=True is built only with pipeline=True (step_pipelined); "
                       f"got pipeline={self.pipeline}")


def build_forward_acc(BH: int, NC: int, group: int, ln_eps: float, *,
                      config: AccTuningConfig = AccTuningConfig(), interpret=None,
                      profile: Profile | None = None, parts: bool = False):
  """Returns f(q, k, v, eta, gamma, beta, w1h, w1l, b1, w2h, w2l, b2) -> (out, ckpts).

  Same argument/result layout as `kernel_mgpu.build_forward` (see there): q, k, v [BH, NC, 64, 64]
  bf16, eta [BH, NC, 64] f32, state chunks [BH, 4, 64, 64] bf16 (hi, lo), b1 [BH, 4, 64],
  b2 [BH, 64]; checkpoints with an [NG] axis after BH ([NG + 1] with `final_checkpoint`).
  parts=True: the kernel's `KernelParts` instead (to run it as one role of a launch).
  profile: time the step's phases
  (`jax.named_scope` regions) on the device (Mosaic GPU profiler).
  """
  C = config.cluster
  NL = NH // C  # hidden chunks of 64 per CTA
  NB = 2 if config.prefetch else 1  # Q/K/V/eta buffers
  NQ = 2 if config.pipeline else NB  # Q buffers (v4: Q_{m-1} is read while Q_m arrives)
  NG = -(-NC // group)
  if config.final_checkpoint and NC % group:
    raise ValueError(f"final_checkpoint needs NC ({NC}) to be a multiple of group ({group})")
  NGO = NG + 1 if config.final_checkpoint else NG  # checkpoints written
  bf16, f32 = jnp.bfloat16, jnp.float32
  shp = (64, 64)
  tr = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  tr32 = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))
  tile = lambda *lead: plgpu.SMEM(lead + shp, bf16, transforms=tr)
  red0 = plgpu.Layout.WGMMA.reduce(0)
  red1 = plgpu.Layout.WGMMA.reduce(1)

  def on_rank0(r, fn):
    """fn() on the cluster's first CTA only (always at cluster 1)."""
    if C == 1:
      fn()
    else:
      pl.when(r == 0)(fn)

  # extra outputs (keys' X2, Z2 [, queries' X2, Z2]); as many f32 staging tiles at the end / 2
  NSAVE = (4 if config.outputs else 2) if config.save_activations else 0
  NSTAGE = NSAVE // 2
  if config.save_ln:  # keys' X2, G2, xhat, h, rstd; staging: xhat, h tiles, rstd vector
    NSAVE, NSTAGE = 5, 3

  def body(*refs, bh=None):
    if not NSAVE:
      return body_(*refs, saves=None, bh=bh)
    if config.save_ln:
      return body_(*refs[:19], *refs[19 + NSAVE:-NSTAGE], saves=refs[19:19 + NSAVE] + refs[-3:],
                   bh=bh)
    # refs: 12 inputs, 7 outputs, NSAVE saved-activation outputs, scratch (staging tiles last);
    # saves: (keys' X2, keys' Z2, queries' X2, queries' Z2, keys' staging, queries' staging)
    pad = (None,) * (4 - NSAVE)
    stage = refs[-NSTAGE:]
    return body_(*refs[:19], *refs[19 + NSAVE:-NSTAGE],
                 saves=refs[19:19 + NSAVE] + pad + stage + pad[:2 - NSTAGE], bh=bh)

  def body_(q_ref, k_ref, v_ref, eta_ref, g_ref, bt_ref, w1h_ref, w1l_ref, b1_ref, w2h_ref,
            w2l_ref, b2_ref, o_ref, cw1h, cw1l, cb1, cw2h, cw2l, cb2,
            q_sb, k_sb, v_sb, ek_s, g2_s, g1_s, ex2_s, x_s, w1h, w2h, lo_s,
            eta_sb, b1_s, b2_s, gam_s, bet_s, bars, *rest, saves, bh=None):
    # precise_update, three_pass: [2, 64, 64] -eta G2 (hi, lo); pipeline: [1, 64, 64] -eta G2
    eg2_s = rest[0] if config.precise_update or config.pipeline or config.three_pass else None
    xch = rest[1:] if eg2_s is not None else rest
    # three_pass: [NL, 64, 64] lo of -eta G1_c (then g1_s holds the hi); ek_s holds G2's lo and
    # x_s the keys' X2 lo (ex2_s their hi) until the update, x_s the queries' X2 after it
    g1l_s = xch[0] if config.three_pass else None
    xch = xch[1:] if config.three_pass else xch
    bh = lax.axis_index("bh") if bh is None else bh  # (a row given: `KernelParts`)
    r = lax.axis_index("c") if C > 1 else 0
    c0 = r * NL  # first global hidden chunk of this CTA

    # ---- initial state: hi into w1h/w2h, lo into lo_s (W1 chunks 0..NL-1, W2 chunks NL..2NL-1)
    plgpu.copy_gmem_to_smem(w1h_ref.at[bh, pl.ds(c0, NL)], w1h, bars.at[0])
    plgpu.copy_gmem_to_smem(w1l_ref.at[bh, pl.ds(c0, NL)], lo_s.at[pl.ds(0, NL)], bars.at[1])
    plgpu.copy_gmem_to_smem(w2h_ref.at[bh, pl.ds(c0, NL)], w2h, bars.at[2])
    plgpu.copy_gmem_to_smem(w2l_ref.at[bh, pl.ds(c0, NL)], lo_s.at[pl.ds(NL, NL)], bars.at[3])
    plgpu.copy_gmem_to_smem(b1_ref.at[bh, pl.ds(c0, NL)], b1_s, bars.at[4])
    plgpu.copy_gmem_to_smem(b2_ref.at[bh], b2_s, bars.at[5])
    plgpu.copy_gmem_to_smem(g_ref.at[bh], gam_s, bars.at[6])
    plgpu.copy_gmem_to_smem(bt_ref.at[bh], bet_s, bars.at[7])
    for i in range(8):
      plgpu.barrier_wait(bars.at[i])
    as_f32 = lambda hi, lo: plgpu.layout_cast(hi[...].astype(f32) + lo[...].astype(f32),
                                              plgpu.Layout.WGMMA)
    w1_0 = tuple(as_f32(w1h.at[c], lo_s.at[c]) for c in range(NL))
    w2_0 = tuple(as_f32(w2h.at[c], lo_s.at[NL + c]) for c in range(NL))

    if C > 1:
      recv0, recv1, rbar0, rbar1, cbar = xch
      plgpu.barrier_arrive(cbar.at[0])  # every CTA's barriers initialised before any push
      plgpu.barrier_wait(cbar.at[0])

    push, pull = pair_exchange(C, r, ((recv0, rbar0), (recv1, rbar1)) if C > 1 else None)

    def allreduce(x, slot):
      """Sum of the [64, 64] f32 partials over the cluster (identity at cluster 1)."""
      push(x, slot)
      return pull(x, slot)

    mm_multi = functools.partial(wgmma_multi, shape=shp)
    mm_chain = functools.partial(wgmma_chain, shape=shp)

    def split_store(x, hi_ref, lo_ref):
      """[64, 64] f32 -> bf16 hi, lo with hi + lo ~ x to ~16 mantissa bits."""
      hi = x.astype(bf16)
      hi_ref[...] = hi
      lo_ref[...] = (x - hi.astype(f32)).astype(bf16)

    def update_state(w1, w2, slot, during=None):
      """W1_c += (-eta K)^T G1_c, W2_c += (-eta X2_c)^T G2 (operands in SMEM), one wait.

      Compiled: accumulated into the carried state (`ACC.init`); `during()` runs after the
      wgmmas are issued, before their wait. Interpret mode has no rule for wgmma under
      `run_state`, so there the products go to fresh accumulators and are added.
      """
      # The (transformed) operand refs are made inside the traced functions: made outside,
      # `run_state` hoists their static indices as constants that the lowering rejects.
      def pairs():  # per accumulator (W1_0.., W2_0..): the products summed into it
        if config.three_pass:  # K exact in bf16: K^T (eG1_hi + eG1_lo); X2 (hi, lo) x eG2 (hi, lo)
          return ([[(k_sb.at[slot].T, g1_s.at[c]), (k_sb.at[slot].T, g1l_s.at[c])]
                   for c in range(NL)]
                  + [[(ex2_s.at[c].T, eg2_s.at[0]), (x_s.at[c].T, eg2_s.at[0]),
                      (ex2_s.at[c].T, eg2_s.at[1])] for c in range(NL)])
        if config.pipeline:  # X2 unscaled (ex2_s holds the keys' X2), -eta folded into G2
          return ([[(ek_s.T, g1_s.at[c])] for c in range(NL)]
                  + [[(ex2_s.at[c].T, eg2_s.at[0])] for c in range(NL)])
        if not config.precise_update:
          return ([[(ek_s.T, g1_s.at[c])] for c in range(NL)]
                  + [[(ex2_s.at[c].T, g2_s)] for c in range(NL)])
        k_s = k_sb.at[slot]
        x2h, x2l = (lambda c: ex2_s.at[c]), (lambda c: lo_s.at[NL + c])
        return ([[(k_s.T, g1_s.at[c]), (k_s.T, lo_s.at[c])] for c in range(NL)]
                + [[(x2h(c).T, eg2_s.at[0]), (x2l(c).T, eg2_s.at[0]), (x2h(c).T, eg2_s.at[1])]
                   for c in range(NL)])
      if interpret is not None or config.fresh_update:
        ps = pairs()
        w1 = tuple(w + x for w, x in zip(w1, wgmma_chains(ps[:NL], shp)))
        if during is not None:
          during()
        return w1, tuple(w + x for w, x in zip(w2, wgmma_chains(ps[NL:], shp)))

      def fn(accs):
        for acc, ps in zip(accs[0] + accs[1], pairs()):
          for a, b in ps:
            plgpu.wgmma(acc, a, b)
        if during is not None:
          during()
      return pl.run_state(fn)((tuple(plgpu.ACC.init(w) for w in w1),
                               tuple(plgpu.ACC.init(w) for w in w2)))

    # This CTA's hidden shard of gelu(xs W1 + b1) W2: [64, 64] f32 partial (no b2).
    mlp_fwd_partial = functools.partial(mlp_forward, w1h=w1h, w2h=w2h, b1_s=b1_s, x_s=x_s, chunks=NL)

    def write_checkpoint(gi, w1, w2):
      """(hi, lo) bf16 of this CTA's chunks + biases to HBM (state before mini-batch gi*group)."""
      if config.checkpoint_lo:
        for c in range(NL):
          lo_s[c] = (w1[c] - w1h[c].astype(f32)).astype(bf16)
          lo_s[NL + c] = (w2[c] - w2h[c].astype(f32)).astype(bf16)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(lo_s.at[pl.ds(0, NL)], cw1l.at[bh, gi, pl.ds(c0, NL)])
        plgpu.copy_smem_to_gmem(lo_s.at[pl.ds(NL, NL)], cw2l.at[bh, gi, pl.ds(c0, NL)])
      plgpu.copy_smem_to_gmem(w1h, cw1h.at[bh, gi, pl.ds(c0, NL)])
      plgpu.copy_smem_to_gmem(w2h, cw2h.at[bh, gi, pl.ds(c0, NL)])
      plgpu.copy_smem_to_gmem(b1_s, cb1.at[bh, gi, pl.ds(c0, NL)])
      on_rank0(r, lambda: plgpu.copy_smem_to_gmem(b2_s, cb2.at[bh, gi]))
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    def start_step(m, w1, w2) -> Phases:
      """A step's named phases (what a `Profile` times), its checkpoint every `group` steps;
      returns them with the "load" phase open."""
      ph = Phases()
      ph("ckpt")

      @pl.when(m % group == 0)
      def _():
        write_checkpoint(m // group, w1, w2)

      ph("load")
      return ph

    def issue_loads(m, slot):
      """TMA of mini-batch m's Q, K, V, eta into buffer `slot` (barriers 4 slot .. 4 slot + 3)."""
      for i, (src, dst) in enumerate(((q_ref, q_sb), (k_ref, k_sb), (v_ref, v_sb),
                                      (eta_ref, eta_sb))):
        if i == 0 and not config.outputs:  # no query half: Q is never read (barrier 0 unused)
          continue
        plgpu.copy_gmem_to_smem(src.at[bh, m], dst.at[slot], bars.at[4 * slot + i])

    def step(m, carry):
      w1, w2 = carry  # NL x [64, 64] f32 each: W1[:, chunk], W2[chunk, :]
      slot = m % NB if NB > 1 else 0
      q_s, k_s, v_s, eta_s = (b.at[slot] for b in (q_sb, k_sb, v_sb, eta_sb))
      ph = start_step(m, w1, w2)
      if NB == 1:
        issue_loads(m, 0)
      else:  # the other buffer was last read by step m-1 (its output TMA already waited)
        @pl.when(m + 1 < NC)
        def _():
          issue_loads(m + 1, 1 - slot)
      for i in range(0 if config.outputs else 1, 4):
        plgpu.barrier_wait(bars.at[4 * slot + i])

      eta_c = plgpu.load(eta_s, layout=red1)  # [64] over rows j
      gam = plgpu.load(gam_s, layout=red0)  # [64] over columns f
      bet = plgpu.load(bet_s, layout=red0)
      kf = k_s[...].astype(f32)
      if not (config.precise_update or config.three_pass):
        ek_s[...] = (-_col_bcast(eta_c, shp) * kf).astype(bf16)  # -diag(eta) K
      w1l, w2l = (lambda c: lo_s.at[c]), (lambda c: lo_s.at[NL + c])  # three_pass: state lo

      # ---- (1)-(3): Z2 = gelu(K W1 + b1) W2 + b2, all-reduced over the hidden shards
      ph("key_fwd")
      b2v = plgpu.load(b2_s, layout=red0)
      if config.three_pass:  # K exact: K W1h + K W1l; X2h W2h + X2h W2l + X2l W2h
        z1s = wgmma_chains([[(k_s, w1h.at[c]), (k_s, w1l(c))] for c in range(NL)], shp)
        for c in range(NL):
          b1c = plgpu.load(b1_s.at[c], layout=red0)
          split_store(_gelu(z1s[c] + _row_bcast(b1c, shp)), ex2_s.at[c], x_s.at[c])
        plgpu.commit_smem()
        pk = mm_chain([pr for c in range(NL) for pr in (
            (ex2_s.at[c], w2h.at[c]), (ex2_s.at[c], w2l(c)), (x_s.at[c], w2h.at[c]))])
      else:
        pk = mlp_fwd_partial(k_s)
      if saves is not None:  # the keys' X2 chunks (committed by mlp_forward)
        plgpu.copy_smem_to_gmem(x_s, saves[0].at[bh, m, pl.ds(c0, NL)])
      ph("xchg")
      z2 = allreduce(pk, 0) + _row_bcast(b2v, shp)
      if saves is not None and not config.save_ln:
        save_f32(z2, saves[4], saves[1].at[bh, m])
      # ---- (4)-(6): fused LayerNorm + L2 backward (replicated on every CTA)
      ph("ln")
      g2, xh, rstd, h = _ln_l2_parts(z2, v_s[...].astype(f32) - kf, gam, bet, ln_eps)
      if config.save_ln:  # (their TMA after the commit below)
        _, kg2, kxh, kh, krstd, xh_st, h_st, rstd_st = saves
        xh_st[...] = xh.astype(bf16)
        h_st[...] = h.astype(bf16)
        rstd_st[...] = rstd
      if config.three_pass:
        split_store(g2, g2_s, ek_s)
      else:
        g2_s[...] = g2.astype(bf16)
      if config.precise_update or config.three_pass:
        split_store(-_col_bcast(eta_c, shp) * g2, eg2_s.at[0], eg2_s.at[1])
      db2 = jnp.sum(_col_bcast(eta_c, shp) * g2, axis=0)
      plgpu.commit_smem()
      if config.save_ln:
        def _():
          for src, dst in ((g2_s, kg2), (xh_st, kxh), (h_st, kh), (rstd_st, krstd)):
            plgpu.copy_smem_to_gmem(src, dst.at[bh, m])
        on_rank0(r, _)
      # ---- (7): G1 = (G2 W2^T) * gelu'(Z1) per local chunk, with the old state
      ph("g1")
      for c in range(NL):
        b1c = plgpu.load(b1_s.at[c], layout=red0)
        if config.three_pass:  # G2h W2h^T + G2h W2l^T + G2l W2h^T (G2's lo in ek_s)
          z1, gw = wgmma_chains([[(k_s, w1h.at[c]), (k_s, w1l(c))],
                                 [(g2_s, w2h.at[c].T), (g2_s, w2l(c).T), (ek_s, w2h.at[c].T)]],
                                shp)
        else:
          z1, gw = mm_multi([(k_s, w1h.at[c]), (g2_s, w2h.at[c].T)])
        x2, gp = _gelu_and_grad(z1 + _row_bcast(b1c, shp))
        g1 = gw * gp
        if config.three_pass:  # X2 (hi, lo) already in ex2_s / x_s from the forward above
          split_store(-_col_bcast(eta_c, shp) * g1, g1_s.at[c], g1l_s.at[c])
        elif config.precise_update:  # lo_s is free between checkpoints
          split_store(-_col_bcast(eta_c, shp) * g1, g1_s.at[c], lo_s.at[c])
          split_store(x2, ex2_s.at[c], lo_s.at[NL + c])
        else:
          g1_s[c] = g1.astype(bf16)
          ex2_s[c] = (-_col_bcast(eta_c, shp) * x2).astype(bf16)  # -diag(eta) X2
        b1_s[c] = b1c - jnp.sum(_col_bcast(eta_c, shp) * g1, axis=0)
      plgpu.commit_smem()

      # ---- (8): W1_c += (-eta K)^T G1_c, W2_c += (-eta X2_c)^T G2 into the state accumulators
      ph("update")
      w1, w2 = update_state(w1, w2, slot)
      ph("store_w")
      for c in range(NL):
        if config.three_pass:  # the next step's operands: hi and lo
          split_store(w1[c], w1h.at[c], lo_s.at[c])
          split_store(w2[c], w2h.at[c], lo_s.at[NL + c])
        else:
          w1h[c] = w1[c].astype(bf16)
          w2h[c] = w2[c].astype(bf16)
      b2_s[...] = b2v - db2
      plgpu.commit_smem()
      if not config.outputs:
        if saves is not None:  # x_s and the staging tile are rewritten next step
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        ph.close()
        return w1, w2
      # ---- (9)-(10): apply the new state to the queries
      ph("query")
      b2n = plgpu.load(b2_s, layout=red0)
      if saves is not None:  # the keys' X2 TMA reads x_s, which the queries' X2 overwrites
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      pq = mlp_fwd_partial(q_s)
      push(pq, 1)
      if saves is not None:
        plgpu.copy_smem_to_gmem(x_s, saves[2].at[bh, m, pl.ds(c0, NL)])
      query_output(q_s, pq, b2n, gam, bet, m, 1,
                   save=None if saves is None else (saves[5], saves[3].at[bh, m]))
      if saves is not None:  # staging tiles and x_s are rewritten next step
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      ph.close()
      return w1, w2

    def save_f32(x, staging, dst):
      """[64, 64] f32 value -> dst (HBM) through an f32 SMEM tile, by the cluster's first CTA."""
      staging[...] = x
      plgpu.commit_smem()
      on_rank0(r, lambda: plgpu.copy_smem_to_gmem(staging, dst))

    def query_output(q_s, z2b_partial, b2v, gam, bet, m, slot, save=None):
      """Mini-batch m's output from this CTA's Z2_bar partial: exchange, LayerNorm, residual, TMA.
      save: (f32 staging tile, HBM destination) for Z2_bar (save_activations)."""
      z2b = pull(z2b_partial, slot) + _row_bcast(b2v, shp)
      if save is not None:
        save_f32(z2b, *save)
      xhb, _ = _ln_stats(z2b, ln_eps)
      out = q_s[...].astype(f32) + _row_bcast(gam, shp) * xhb + _row_bcast(bet, shp)

      def write_out():
        q_s[...] = out.astype(bf16)  # q_s doubles as the output tile
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_s, o_ref.at[bh, m])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      on_rank0(r, write_out)

    def step_pipelined(m, carry):
      """v4: mini-batch m's update with W_m and mini-batch m-1's query path, also with W_m.

      Exchange order per step: keys' Z2 (slot 0) pushed and read, then queries' Z2_bar (slot 1)
      pushed; a CTA can push slot 0 of step m+1 only after the peer's slot 1 push of step m, which
      the peer makes after reading its slot 0: no slot is overwritten before it is read.
      """
      w1, w2 = carry  # NL x [64, 64] f32 each: W1[:, chunk], W2[chunk, :]
      q_prev, q_cur = q_sb.at[(m + 1) % 2], q_sb.at[m % 2]  # Q_{m-1}, Q_m
      k_s, v_s, eta_s = k_sb.at[0], v_sb.at[0], eta_sb.at[0]
      ph = start_step(m, w1, w2)
      if config.prefetch_next:  # issued by step m-1 (or before the loop): barriers 0-3
        for i in range(4):
          plgpu.barrier_wait(bars.at[i])
      else:
        copy_in([(src.at[bh, m], dst) for src, dst in ((q_ref, q_cur), (k_ref, k_s),
                                                       (v_ref, v_s), (eta_ref, eta_s))], bars)

      eta_c = plgpu.load(eta_s, layout=red1)  # [64] over rows j
      gam = plgpu.load(gam_s, layout=red0)  # [64] over columns f
      bet = plgpu.load(bet_s, layout=red0)
      b2v = plgpu.load(b2_s, layout=red0)  # b2 after update m-1: used by both halves
      kf = k_s[...].astype(f32)
      ek_s[...] = (-_col_bcast(eta_c, shp) * kf).astype(bf16)  # -diag(eta) K

      # ---- forward halves with W_m: X2 = gelu(x W1 + b1) for x = Q_{m-1} (x_s), K_m (ex2_s)
      ph("z1")
      # early_gelu_grad: gelu'(K W1_c + b1_c) goes to gp_s(c) = lo_s.at[c] for the "g1" phase. The
      # tile is free from here to the end of the step: with pipeline (hence no precise_update and
      # no three_pass) lo_s is written and read only by the initial state load (before the loop)
      # and by write_checkpoint at this step's start, which returns only after its TMA reads of
      # lo_s are done (`wait_smem_to_gmem(0, wait_read_only=True)`); the next step's checkpoint
      # overwrites the tile only after this step's "g1" has read it. Store, load and that next
      # overwrite all use the WGMMA layout: every thread touches only its own elements.
      # The Z1 and b1 used here are those the "g1" phase would recompute: w1h changes only in
      # "store_w" and b1_s only at the end of "g1" (chunk c after its own read).
      gp_s = lambda c: lo_s.at[c]  # [64, 64] bf16, c < NL
      for c in range(NL):
        b1c = _row_bcast(plgpu.load(b1_s.at[c], layout=red0), shp)
        zq, zk = mm_multi([(q_prev, w1h.at[c]), (k_s, w1h.at[c])])
        x_s[c] = _gelu(zq + b1c).astype(bf16)
        if config.early_gelu_grad:
          x2k, gpk = _gelu_and_grad(zk + b1c)  # [64, 64] f32 each, one tanh
          ex2_s[c] = x2k.astype(bf16)
          gp_s(c)[...] = gpk.astype(bf16)
        else:
          ex2_s[c] = _gelu(zk + b1c).astype(bf16)
      plgpu.commit_smem()
      ph("z2")
      pk, pq = wgmma_chains([[(ex2_s.at[c], w2h.at[c]) for c in range(NL)],
                             [(x_s.at[c], w2h.at[c]) for c in range(NL)]], shp)
      # ---- (1)-(3) keys: Z2 all-reduced; then the queries' partial goes out
      ph("xchg")
      z2 = allreduce(pk, 0) + _row_bcast(b2v, shp)
      push(pq, 1)
      ph("ln")
      # ---- (4)-(6): fused LayerNorm + L2 backward (replicated on every CTA)
      g2 = _ln_l2_grad(z2, v_s[...].astype(f32) - kf, gam, bet, ln_eps)
      g2_s[...] = g2.astype(bf16)
      eg2 = -_col_bcast(eta_c, shp) * g2
      eg2_s[0] = eg2.astype(bf16)
      b2_s[...] = b2v + jnp.sum(eg2, axis=0)
      plgpu.commit_smem()
      # ---- (7): G1 = (G2 W2^T) * gelu'(Z1) per local chunk, with the old state
      ph("g1")
      if config.early_gelu_grad:  # gelu'(Z1_c) from the "z1" phase: only G2 W2_c^T, one wait
        gws = wgmma_multi([(g2_s, w2h.at[c].T) for c in range(NL)], shp)  # NL x [64, 64] f32
      for c in range(NL):
        b1c = plgpu.load(b1_s.at[c], layout=red0)
        if config.early_gelu_grad:
          # WGMMA layout, as stored: every thread reads back the elements it wrote
          gp = plgpu.load(gp_s(c), layout=plgpu.Layout.WGMMA).astype(f32)  # [64, 64] f32
          gw = gws[c]
        else:
          z1, gw = mm_multi([(k_s, w1h.at[c]), (g2_s, w2h.at[c].T)])
          _, gp = _gelu_and_grad(z1 + _row_bcast(b1c, shp))
        g1 = gw * gp
        g1_s[c] = g1.astype(bf16)
        if not config.late_bias_sums:
          b1_s[c] = b1c - jnp.sum(_col_bcast(eta_c, shp) * g1, axis=0)
      plgpu.commit_smem()

      # ---- (8) update; meanwhile (9)-(10) for the queries of mini-batch m-1 (state W_m)
      def previous_queries():
        @pl.when(m > 0)
        def _():
          query_output(q_prev, pq, b2v, gam, bet, m - 1, 1)

        if C > 1:  # step 0's slot-1 push still has to be received (the phase count stays even)
          @pl.when(m == 0)
          def _():
            pull(pq, 1)
        if config.late_bias_sums:  # b1 of step m (read next by step m+1's "z1")
          for c in range(NL):
            g1 = plgpu.load(g1_s.at[c], layout=plgpu.Layout.WGMMA).astype(f32)
            b1_s[c] = (plgpu.load(b1_s.at[c], layout=red0)
                       - jnp.sum(_col_bcast(eta_c, shp) * g1, axis=0))
      ph("update")
      if config.prefetch_next:  # K, V, eta of step m: last read before g1's commit (wgmmas waited)
        @pl.when(m + 1 < NC)
        def _():
          for i, (src, dst) in enumerate(((k_ref, k_s), (v_ref, v_s), (eta_ref, eta_s))):
            plgpu.copy_gmem_to_smem(src.at[bh, m + 1], dst, bars.at[1 + i])
      w1, w2 = update_state(w1, w2, 0, during=previous_queries)
      ph("store_w")
      for c in range(NL):
        w1h[c] = w1[c].astype(bf16)
        w2h[c] = w2[c].astype(bf16)
      plgpu.commit_smem()
      if config.prefetch_next:  # Q_{m+1} into Q_{m-1}'s buffer: its output TMA was waited for
        @pl.when(m + 1 < NC)  # (read-only) and the commit above ordered every thread's reads
        def _():
          plgpu.copy_gmem_to_smem(q_ref.at[bh, m + 1], q_prev, bars.at[0])
      ph.close()
      return w1, w2

    if config.pipeline:
      # Q_0 also into the "previous queries" slot: step 0's query half then reads finite values
      plgpu.copy_gmem_to_smem(q_ref.at[bh, 0], q_sb.at[1], bars.at[0])
      plgpu.barrier_wait(bars.at[0])
      if config.prefetch_next:  # step 0's inputs (step m issues step m+1's)
        for i, (src, dst) in enumerate(((q_ref, q_sb.at[0]), (k_ref, k_sb.at[0]),
                                        (v_ref, v_sb.at[0]), (eta_ref, eta_sb.at[0]))):
          plgpu.copy_gmem_to_smem(src.at[bh, 0], dst, bars.at[i])
      w1, w2 = lax.fori_loop(0, NC, step_pipelined, (w1_0, w2_0))
      del w1, w2
      # ---- the last mini-batch's queries with the final state
      q_last = q_sb.at[(NC - 1) % 2]
      b2n = plgpu.load(b2_s, layout=red0)
      pq = mlp_fwd_partial(q_last)
      push(pq, 0)
      query_output(q_last, pq, b2n, plgpu.load(gam_s, layout=red0),
                   plgpu.load(bet_s, layout=red0), NC - 1, 0)
    else:
      if NB > 1:
        issue_loads(0, 0)
      w1, w2 = lax.fori_loop(0, NC, step, (w1_0, w2_0))
      if config.final_checkpoint:  # (the last step committed the state's SMEM copies)
        write_checkpoint(NG, w1, w2)
    plgpu.wait_smem_to_gmem(0)
    if C > 1:
      plgpu.barrier_arrive(cbar.at[0])  # no CTA exits while its peer may still push into it
      plgpu.barrier_wait(cbar.at[0])

  st = lambda *s: jax.ShapeDtypeStruct(s, bf16)
  sf = lambda *s: jax.ShapeDtypeStruct(s, f32)
  out_type = (st(BH, NC, CS, F), st(BH, NGO, NH, 64, 64), st(BH, NGO, NH, 64, 64),
              sf(BH, NGO, NH, 64), st(BH, NGO, NH, 64, 64), st(BH, NGO, NH, 64, 64),
              sf(BH, NGO, 64))
  if config.save_ln:  # keys' X2 chunks, G2, xhat, h, rstd per step
    out_type += (st(BH, NC, NH, 64, 64), st(BH, NC, 64, 64), st(BH, NC, 64, 64),
                 st(BH, NC, 64, 64), sf(BH, NC, 64))
  elif NSAVE:  # keys' X2 chunks, keys' Z2[, queries' X2 chunks, queries' Z2] per step
    out_type += (st(BH, NC, NH, 64, 64), sf(BH, NC, 64, 64), st(BH, NC, NH, 64, 64),
                 sf(BH, NC, 64, 64))[:NSAVE]
  scratch = [tile(NQ), tile(NB), tile(NB), tile(), tile(),  # q, k, v, -eta K, G2
             tile(NL), tile(NL), tile(NL),  # G1_c, -eta X2_c, X2 (forward)
             tile(NL), tile(NL), tile(2 * NL),  # W1 bf16, W2 bf16, lo (checkpoints / init)
             plgpu.SMEM((NB, 64), f32), plgpu.SMEM((NL, 64), f32), plgpu.SMEM((64,), f32),
             plgpu.SMEM((64,), f32), plgpu.SMEM((64,), f32),
             plgpu.Barrier(num_barriers=8)]
  if config.precise_update or config.pipeline or config.three_pass:
    scratch.append(tile(1 if config.pipeline else 2))
  if config.three_pass:
    scratch.append(tile(NL))  # lo of -eta G1_c
  kwargs = {}
  if C > 1:
    scratch += [plgpu.SMEM(shp, f32, transforms=tr32), plgpu.SMEM(shp, f32, transforms=tr32),
                plgpu.Barrier(num_arrivals=C - 1, num_barriers=1),
                plgpu.Barrier(num_arrivals=C - 1, num_barriers=1),
                plgpu.ClusterBarrier(collective_axes=("c",), num_barriers=1)]
    kwargs.update(cluster=(C,), cluster_names=("c",))
  if config.save_ln:  # staging of xhat, h, rstd (kept last: see body)
    scratch += [tile(), tile(), plgpu.SMEM((64,), f32)]
  elif NSAVE:  # f32 staging of the keys' [and the queries'] Z2 (kept last: see body)
    scratch += [plgpu.SMEM(shp, f32, transforms=tr32) for _ in range(NSTAGE)]
  if parts:
    return KernelParts(body, out_type, scratch, kwargs, config.approx_math,
                       config.reduction_scratch)
  return per_head_kernel(body, out_type=out_type, scratch=scratch, BH=BH,
                         approx_math=config.approx_math, interpret=interpret, profile=profile,
                         reduction_scratch=config.reduction_scratch,
                         **kwargs)


def main(argv=None) -> dict[str, float]:
  """Times the v3 / v4 family against the float32 XLA scan (`kernel_bench.forward_main`):
  `python -m pallas_kernels.ttt_mlp.kernel_acc_mgpu [--nc N] [--variants V,...] [--interpret]`."""
  from pallas_kernels import kernel_bench
  variants = ("v3", "v3_precise", "v3_exact", "v3_3pass", "v4", "v5", "v4p", "v4l")
  return kernel_bench.forward_main(argv, main.__doc__, variants, ("v3", "v4", "v3_3pass"), layer="mlp")


if __name__ == "__main__":
  main()
