"""TTT-MLP forward scan, v6: v4 with the CTA's hidden chunks split over two consumer warpgroups.

v4 (`kernel_acc_mgpu`, `pipeline=True`) carries this CTA's whole state shard (2 chunks of W1 and
W2: 128 float32 accumulator registers per thread) in one warpgroup: ptxas spills at 255
registers, and each SM sub-partition has one warp to issue from. Here warpgroup w of each CTA owns
the local hidden chunks [w NW, (w + 1) NW) (NW = 1 on the GPU's 2-CTA cluster, 2 at cluster 1):
its W1/W2 chunks (64 registers per thread at cluster 2) and b1 as a row-replicated [64, 64]
accumulator (`B1`). The per-chunk work (Z1 and GELU of keys and queries, the Z2 partials, G1, the
update) runs on both warpgroups at once; warpgroup 0 alone does the cluster exchange, the
replicated LayerNorm / L2 gradient (G2, b2) and the queries' outputs, as in v4.

Step m (keys of m, queries of m-1, both with the state W_m), per warpgroup:
  load (wg 0 issues)  ->  z1: X2 = gelu(x W1_c + B1_c) for x = Q_{m-1}, K_m, gelu'(K W1_c + B1_c)
  kept in registers  ->  z2: the chunks' Z2 partials  ->  wg 1 hands its partials to wg 0 in SMEM
  (then writes -eta K and the b1 operand -eta 1^T (hi, lo))  ->  wg 0: cluster all-reduce, G2,
  b2, hands G2 and -eta G2 to wg 1  ->  g1: G1_c = (G2 W2_c^T) * gelu'  ->  update (wgmma into the
  carried accumulators): W1_c += (-eta K)^T G1_c, W2_c += X2_c^T (-eta G2),
  B1_c += (-eta 1^T)^T G1_c
  (wg 0 meanwhile: the queries' exchange, LayerNorm and output of mini-batch m-1).
Why B1 is a matrix: a column sum of a WGMMA-layout value is a cross-warp reduction through one
SMEM scratch region per CTA (jax 0.11.2), which two warpgroups must not use at the same time; as
a wgmma of a column-replicated -eta tile (transposed) (bf16 hi + lo) with G1 (bf16, the update's operand), b1's
update needs no reduction. The only column reductions left are wg 0's b2 sum and, at checkpoints,
each warpgroup's column max of B1 (its identical rows), done one warpgroup after the other.
Hand-offs are mbarriers (`sync`); every other SMEM tile is written and read by one warpgroup or
ordered by the step's TMA barriers (see `body`). CPU interpret mode runs both warpgroups at cluster
1 with race detection (tests/pallas_kernels); cluster 2 is lowered for CUDA there and run on GPU.
Same argument/result layout as `kernel_acc_mgpu.build_forward_acc`. H100 (NOTES-ttt-mlp.md "v6"):
v4's accuracy, 40% slower; each hand-off costs about a cluster exchange. Opt-in (`variant="v6"`).
`python -m pallas_kernels.ttt_mlp.kernel_wg2_mgpu` times it against the float32 XLA scan (`kernel_bench`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mgpu_common import (DEFAULT_REDUCTION_SCRATCH, Phases, Profile, bf16_tiles,
                                        check_cluster, f32_tile, pair_exchange, per_head_kernel)
from pallas_kernels.ttt_mlp.kernel_mgpu import (CS, F, NH, _col_bcast, _gelu, _gelu_and_grad,
                                                _ln_l2_grad, _ln_stats, _row_bcast, wgmma_chain,
                                                wgmma_chains, wgmma_multi)

WG = 2  # consumer warpgroups per CTA


@dataclasses.dataclass(frozen=True)
class Wg2TuningConfig:
  """Frozen v6 configuration (validated for F = CS = 64, hidden 256)."""

  cluster: int = 2  # CTAs per head; hidden 256 / cluster per CTA, split over WG warpgroups
  approx_math: bool = True  # tanh.approx etc. in GELU / LayerNorm (Mosaic GPU approx_math)
  # SMEM bytes for column sums' cross-warp reductions (`mgpu_common.DEFAULT_REDUCTION_SCRATCH`)
  reduction_scratch: int = DEFAULT_REDUCTION_SCRATCH

  def __post_init__(self):
    check_cluster(self.cluster)


def build_forward_wg2(BH: int, NC: int, group: int, ln_eps: float, *,
                      config: Wg2TuningConfig = Wg2TuningConfig(), interpret=None,
                      profile: Profile | None = None):
  """Returns f(q, k, v, eta, gamma, beta, w1h, w1l, b1, w2h, w2l, b2) -> (out, ckpts): the layout
  of `kernel_acc_mgpu.build_forward_acc` (q, k, v [BH, NC, 64, 64] bf16, eta [BH, NC, 64] f32,
  state chunks [BH, 4, 64, 64] bf16 (hi, lo), b1 [BH, 4, 64], b2 [BH, 64]; checkpoints with an
  [NG] axis after BH, the state before mini-batch g * group)."""
  C = config.cluster
  NL = NH // C  # hidden chunks of 64 per CTA
  NW = NL // WG  # per warpgroup
  NG = -(-NC // group)
  bf16, f32 = jnp.bfloat16, jnp.float32
  shp = (64, 64)
  tile = bf16_tiles
  red0 = plgpu.Layout.WGMMA.reduce(0)  # [64] over columns
  red1 = plgpu.Layout.WGMMA.reduce(1)  # [64] over rows
  row = lambda v: _row_bcast(v, shp)
  col = lambda v: _col_bcast(v, shp)
  mm_multi = functools.partial(wgmma_multi, shape=shp)

  def body(q_ref, k_ref, v_ref, eta_ref, g_ref, bt_ref, w1h_ref, w1l_ref, b1_ref, w2h_ref,
           w2l_ref, b2_ref, o_ref, cw1h, cw1l, cb1, cw2h, cw2l, cb2,
           q_sb, k_s, v_s, eta_s, ek_s, ea_s, g2_s, eg2_s, g1_s, ex2_s, x_s, w1h, w2h, union,
           b1v_s, b2_s, gam_s, bet_s, bars, sync, both, *xch):
    # Tiles: q_sb (Q_{m-1}, Q_m), k/v/eta, -eta K (ek_s), -eta 1^T hi/lo (ea_s), G2, -eta G2,
    # per chunk G1, keys' X2 (ex2_s), queries' X2 (x_s), W1/W2 bf16. `union`: the state's lo
    # halves (init and checkpoints only) share bytes with wg 1's two f32 Z2 partials.
    # sync[0]: wg 1's partials are in SMEM; sync[1]: wg 1 wrote ek_s, ea_s; sync[2]: wg 0 wrote
    # G2, -eta G2; sync[3]: wg 0's checkpoint column max is done (wg 1's may start).
    # both: the two warpgroups meet (after init and after each checkpoint's TMA reads).
    lo_s, (part_k, part_q) = union
    bh = lax.axis_index("bh")
    r = lax.axis_index("c") if C > 1 else 0
    w = lax.axis_index("wg")
    c0 = r * NL  # first global hidden chunk of this CTA
    own = [w * NW + j for j in range(NW)]  # this warpgroup's local chunks

    def on_wg(i, fn):
      pl.when(w == i)(fn)

    def on_out_writer(fn):
      """fn() on warpgroup 0 of the cluster's first CTA."""
      pl.when(w == 0 if C == 1 else (w == 0) & (r == 0))(fn)

    def meet():
      plgpu.barrier_arrive(both.at[0])
      plgpu.barrier_wait(both.at[0])

    # ---- initial state (wg 0 issues the copies, both wait): hi, lo, b1 per chunk, b2, gamma, beta
    def init_copies():
      copies = ((w1h_ref.at[bh, pl.ds(c0, NL)], w1h), (w1l_ref.at[bh, pl.ds(c0, NL)],
                                                       lo_s.at[pl.ds(0, NL)]),
                (w2h_ref.at[bh, pl.ds(c0, NL)], w2h), (w2l_ref.at[bh, pl.ds(c0, NL)],
                                                       lo_s.at[pl.ds(NL, NL)]),
                (b1_ref.at[bh, pl.ds(c0, NL)], b1v_s), (b2_ref.at[bh], b2_s),
                (g_ref.at[bh], gam_s), (bt_ref.at[bh], bet_s))
      for i, (src, dst) in enumerate(copies):
        plgpu.copy_gmem_to_smem(src, dst, bars.at[i])
    on_wg(0, init_copies)
    for i in range(8):
      plgpu.barrier_wait(bars.at[i])
    as_f32 = lambda hi, lo: plgpu.layout_cast(hi[...].astype(f32) + lo[...].astype(f32),
                                              plgpu.Layout.WGMMA)
    w1_0 = tuple(as_f32(w1h.at[c], lo_s.at[c]) for c in own)
    w2_0 = tuple(as_f32(w2h.at[c], lo_s.at[NL + c]) for c in own)
    bb1_0 = tuple(plgpu.layout_cast(row(plgpu.load(b1v_s.at[c], layout=red0)), plgpu.Layout.WGMMA)
                  for c in own)
    meet()  # lo_s read by both before wg 1 writes the partials that share its bytes
    if C > 1:
      recv0, recv1, rbar0, rbar1, cbar = xch

      def cluster_meet():
        plgpu.barrier_arrive(cbar.at[0])
        plgpu.barrier_wait(cbar.at[0])
      on_wg(0, cluster_meet)  # every CTA's barriers initialised before any push

    # (wg 0 only: the exchange slots and their barriers are wg 0's)
    push, pull = pair_exchange(C, r, ((recv0, rbar0), (recv1, rbar1)) if C > 1 else None)

    def query_output(q_s, z2b_cta, b2v, gam, bet, m, slot):
      """wg 0: mini-batch m's output from the CTA's Z2_bar partial (exchange, LN, residual, TMA)."""
      z2b = pull(z2b_cta, slot) + row(b2v)
      xhb, _ = _ln_stats(z2b, ln_eps)
      out = q_s[...].astype(f32) + row(gam) * xhb + row(bet)

      def write_out():
        q_s[...] = out.astype(bf16)  # q_s doubles as the output tile
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_s, o_ref.at[bh, m])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      on_out_writer(write_out)

    def write_checkpoint(gi, w1, w2, bb1):
      """(hi, lo) bf16 of this warpgroup's chunks and their b1 rows to HBM (state before
      mini-batch gi * group); b2 by wg 0 of the first CTA."""
      for j, c in enumerate(own):
        lo_s[c] = (w1[j] - w1h[c].astype(f32)).astype(bf16)
        lo_s[NL + c] = (w2[j] - w2h[c].astype(f32)).astype(bf16)
      on_wg(1, lambda: plgpu.barrier_wait(sync.at[3]))  # column reductions: wg 0, then wg 1
      for j, c in enumerate(own):
        b1v_s[c] = jnp.max(bb1[j], axis=0)  # B1's rows are equal: any row, exactly
      on_wg(0, lambda: plgpu.barrier_arrive(sync.at[3]))
      plgpu.commit_smem()
      for c in own:
        plgpu.copy_smem_to_gmem(w1h.at[c], cw1h.at[bh, gi, c0 + c])
        plgpu.copy_smem_to_gmem(lo_s.at[c], cw1l.at[bh, gi, c0 + c])
        plgpu.copy_smem_to_gmem(w2h.at[c], cw2h.at[bh, gi, c0 + c])
        plgpu.copy_smem_to_gmem(lo_s.at[NL + c], cw2l.at[bh, gi, c0 + c])
        plgpu.copy_smem_to_gmem(b1v_s.at[c], cb1.at[bh, gi, c0 + c])
      on_out_writer(lambda: plgpu.copy_smem_to_gmem(b2_s, cb2.at[bh, gi]))
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      meet()  # lo_s (shared with the partials) read by both warpgroups' TMAs

    def update_state(w1, w2, bb1, during):
      """W1_c += (-eta K)^T G1_c, W2_c += X2_c^T (-eta G2), B1_c += (-eta 1^T)^T (hi + lo) G1_c.

      Compiled: accumulated into the carried state; `during()` runs after the wgmmas are issued,
      before their wait. Interpret mode (no wgmma rule under `run_state`): fresh products, added.
      """
      def pairs():  # per accumulator (W1 chunks, W2 chunks, B1 chunks): the products summed in
        return ([[(ek_s.T, g1_s.at[c])] for c in own]
                + [[(ex2_s.at[c].T, eg2_s)] for c in own]
                + [[(ea_s.at[0].T, g1_s.at[c]), (ea_s.at[1].T, g1_s.at[c])] for c in own])
      if interpret is not None:
        d = [wgmma_chain(ps, shp) for ps in pairs()]
        during()
        return tuple(tuple(a + x for a, x in zip(acc, d[i * NW:(i + 1) * NW]))
                     for i, acc in enumerate((w1, w2, bb1)))

      def fn(accs):
        for acc, ps in zip(accs[0] + accs[1] + accs[2], pairs()):
          for a, b in ps:
            plgpu.wgmma(acc, a, b)
        during()
      return pl.run_state(fn)(tuple(tuple(plgpu.ACC.init(x) for x in acc)
                                    for acc in (w1, w2, bb1)))

    def step(m, carry):
      """Mini-batch m's update and mini-batch m-1's queries, both with the state W_m."""
      w1, w2, bb1 = carry  # NW x [64, 64] f32 each: W1[:, c], W2[c, :], b1_c row-replicated
      q_prev, q_cur = q_sb.at[(m + 1) % 2], q_sb.at[m % 2]  # Q_{m-1}, Q_m
      ph = Phases()
      ph("ckpt")

      @pl.when(m % group == 0)
      def _():
        write_checkpoint(m // group, w1, w2, bb1)

      ph("load")

      def loads():
        for i, (src, dst) in enumerate(((q_ref, q_cur), (k_ref, k_s), (v_ref, v_s),
                                        (eta_ref, eta_s))):
          plgpu.copy_gmem_to_smem(src.at[bh, m], dst, bars.at[i])
      on_wg(0, loads)
      for i in range(4):
        plgpu.barrier_wait(bars.at[i])

      # ---- this warpgroup's chunks: X2 of queries (x_s) and keys (ex2_s), gelu' of the keys
      ph("z1")
      # b2 after update m-1 (both halves use it): read before wg 1 signals (wg 0 rewrites it)
      b2v = plgpu.load(b2_s, layout=red0)
      gam = plgpu.load(gam_s, layout=red0)
      bet = plgpu.load(bet_s, layout=red0)
      gps = []
      zs = mm_multi([p for c in own for p in ((q_prev, w1h.at[c]), (k_s, w1h.at[c]))])
      for j, c in enumerate(own):
        x_s[c] = _gelu(zs[2 * j] + bb1[j]).astype(bf16)
        x2k, gpk = _gelu_and_grad(zs[2 * j + 1] + bb1[j])
        ex2_s[c] = x2k.astype(bf16)
        gps.append(gpk)
      plgpu.commit_smem()
      ph("z2")
      pk, pq = wgmma_chains([[(ex2_s.at[c], w2h.at[c]) for c in own],
                             [(x_s.at[c], w2h.at[c]) for c in own]], shp)

      # ---- the CTA's partials: wg 1 hands its own to wg 0, then writes the update's operands
      ph("csum")

      def wg1_partials():
        part_k[...] = pk
        part_q[...] = pq
      on_wg(1, wg1_partials)
      on_wg(0, lambda: plgpu.barrier_wait(sync.at[0]))
      # own + wg 1's partial. wg 1 computes the same expression on its own values and never uses
      # it (a value cannot leave a `pl.when` branch); it reads the tiles before it signals wg 0,
      # so wg 0's later writes to the bytes they share (checkpoint lo) come after the read.
      pk_cta = pk + part_k[...]
      pq_cta = pq + part_q[...]

      def wg1_operands():
        plgpu.barrier_arrive(sync.at[0])
        eta_c = plgpu.load(eta_s, layout=red1)  # over rows j
        ek_s[...] = (-col(eta_c) * k_s[...].astype(f32)).astype(bf16)  # -diag(eta) K
        # a[i, j] = -eta_i; as the transposed wgmma operand a^T @ G1 puts -sum_j eta_j G1[j, :]
        # in every row. (A row broadcast of eta loaded over columns instead, a[i, j] = -eta_j, makes
        # Mosaic GPU's layout inference run out of fuel in jax 0.11.2.)
        a = plgpu.layout_cast(-col(eta_c), plgpu.Layout.WGMMA)
        a_hi = a.astype(bf16)
        ea_s[0] = a_hi
        ea_s[1] = (a - a_hi.astype(f32)).astype(bf16)
        plgpu.commit_smem()
        plgpu.barrier_arrive(sync.at[1])
      on_wg(1, wg1_operands)

      # ---- wg 0: keys' Z2 all-reduced, then the queries' partial goes out; G2, b2 (replicated
      # on every CTA); G2 and -eta G2 to wg 1
      ph("xchg_ln")

      def wg0_keys():
        push(pk_cta, 0)
        z2 = pull(pk_cta, 0) + row(b2v)
        push(pq_cta, 1)
        kf = k_s[...].astype(f32)
        g2 = _ln_l2_grad(z2, v_s[...].astype(f32) - kf, gam, bet, ln_eps)
        g2_s[...] = g2.astype(bf16)
        eg2 = -col(plgpu.load(eta_s, layout=red1)) * g2
        eg2_s[...] = eg2.astype(bf16)
        b2_s[...] = b2v + jnp.sum(eg2, axis=0)
        plgpu.commit_smem()
        plgpu.barrier_arrive(sync.at[2])
      on_wg(0, wg0_keys)
      on_wg(1, lambda: plgpu.barrier_wait(sync.at[2]))

      # ---- (7): G1_c = (G2 W2_c^T) * gelu'(Z1_c), old state
      ph("g1")
      gws = mm_multi([(g2_s, w2h.at[c].T) for c in own])
      for j, c in enumerate(own):
        g1_s[c] = (gws[j] * gps[j]).astype(bf16)
      plgpu.commit_smem()
      on_wg(0, lambda: plgpu.barrier_wait(sync.at[1]))  # ek_s, ea_s from wg 1

      # ---- (8) update; meanwhile wg 0 finishes the queries of mini-batch m-1 (state W_m)
      def previous_queries():
        @pl.when((w == 0) & (m > 0))
        def _():
          query_output(q_prev, pq_cta, b2v, gam, bet, m - 1, 1)

        if C > 1:  # step 0's slot-1 push still has to be received (the phase count stays even)
          @pl.when((w == 0) & (m == 0))
          def _():
            pull(pq_cta, 1)
      ph("update")
      w1, w2, bb1 = update_state(w1, w2, bb1, previous_queries)
      ph("store_w")
      for j, c in enumerate(own):
        w1h[c] = w1[j].astype(bf16)
        w2h[c] = w2[j].astype(bf16)
      plgpu.commit_smem()
      ph.close()
      return w1, w2, bb1

    # Q_0 also into the "previous queries" slot: step 0's query half then reads finite values
    def first_q():
      plgpu.copy_gmem_to_smem(q_ref.at[bh, 0], q_sb.at[1], bars.at[0])
    on_wg(0, first_q)
    plgpu.barrier_wait(bars.at[0])
    w1, w2, bb1 = lax.fori_loop(0, NC, step, (w1_0, w2_0, bb1_0))

    # ---- the last mini-batch's queries with the final state
    q_last = q_sb.at[(NC - 1) % 2]
    zl = mm_multi([(q_last, w1h.at[c]) for c in own])
    for j, c in enumerate(own):
      x_s[c] = _gelu(zl[j] + bb1[j]).astype(bf16)
    plgpu.commit_smem()
    pq = wgmma_chain([(x_s.at[c], w2h.at[c]) for c in own], shp)

    def wg1_last():
      part_q[...] = pq
      plgpu.barrier_arrive(sync.at[0])
    on_wg(1, wg1_last)

    def wg0_last():
      plgpu.barrier_wait(sync.at[0])
      pq_cta = pq + part_q[...]
      push(pq_cta, 0)
      query_output(q_last, pq_cta, plgpu.load(b2_s, layout=red0),
                   plgpu.load(gam_s, layout=red0), plgpu.load(bet_s, layout=red0), NC - 1, 0)
    on_wg(0, wg0_last)
    plgpu.wait_smem_to_gmem(0)
    if C > 1:
      on_wg(0, cluster_meet)  # no CTA exits while its peer may still push into it

  st = lambda *s: jax.ShapeDtypeStruct(s, bf16)
  sf = lambda *s: jax.ShapeDtypeStruct(s, f32)
  out_type = (st(BH, NC, CS, F), st(BH, NG, NH, 64, 64), st(BH, NG, NH, 64, 64),
              sf(BH, NG, NH, 64), st(BH, NG, NH, 64, 64), st(BH, NG, NH, 64, 64), sf(BH, NG, 64))
  scratch = [tile(2), tile(), tile(), plgpu.SMEM((64,), f32),  # Q_{m-1} / Q_m, K, V, eta
             tile(), tile(2), tile(), tile(),  # -eta K, -eta 1^T (hi, lo), G2, -eta G2
             tile(NL), tile(NL), tile(NL), tile(NL), tile(NL),  # G1, keys' X2, queries' X2, W1, W2
             plgpu.RefUnion(tile(2 * NL), [f32_tile(), f32_tile()]),  # lo | wg 1's Z2 partials
             plgpu.SMEM((NL, 64), f32), plgpu.SMEM((64,), f32),  # b1 rows (init, ckpt), b2
             plgpu.SMEM((64,), f32), plgpu.SMEM((64,), f32),  # gamma, beta
             plgpu.Barrier(num_barriers=8), plgpu.Barrier(num_barriers=4),
             plgpu.Barrier(num_arrivals=WG, num_barriers=1)]
  kwargs = dict(num_threads=WG, thread_name="wg")
  if C > 1:
    scratch += [f32_tile(), f32_tile(),
                plgpu.Barrier(num_arrivals=C - 1, num_barriers=1),
                plgpu.Barrier(num_arrivals=C - 1, num_barriers=1),
                plgpu.ClusterBarrier(collective_axes=("c",), num_barriers=1)]
    kwargs.update(cluster=(C,), cluster_names=("c",))
  return per_head_kernel(body, out_type=out_type, scratch=scratch, BH=BH,
                         approx_math=config.approx_math, interpret=interpret, profile=profile,
                         reduction_scratch=config.reduction_scratch, **kwargs)


def main(argv=None) -> dict[str, float]:
  """Times v6 against the float32 XLA scan (`kernel_bench.forward_main`):
  `python -m pallas_kernels.ttt_mlp.kernel_wg2_mgpu [--nc N] [--variants V,...] [--interpret]`."""
  from pallas_kernels import kernel_bench
  variants = ("v6",)
  return kernel_bench.forward_main(argv, main.__doc__, variants, None, layer="mlp")


if __name__ == "__main__":
  main()
