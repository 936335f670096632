"""TTT-MLP forward scan, v7: v4's step split by role over two warpgroups per CTA.

v4 (`kernel_acc_mgpu`, `pipeline=True`) runs the state trajectory (keys: Z1, Z2, exchange,
LayerNorm gradient, G1, update) and the outputs (queries of the previous mini-batch with the same
state) in one warpgroup: the queries' GELU, exchange, LayerNorm and output share its instruction
stream and registers with the trajectory's latency chain. v6 split the hidden chunks over two
warpgroups and lost to the hand-offs on that chain (NOTES-ttt-mlp.md). Here the split is by role,
so no hand-off sits on the chain:
- warpgroup 0 ("keys") carries this CTA's float32 state shard (W1_c, W2_c accumulators; b1, b2 in
  SMEM) and runs only the trajectory. After step m's update it stores the bf16 state W_{m+1} (and
  b1, b2) to SMEM and arrives on `sync[0]`.
- warpgroup 1 ("queries") waits for that, computes mini-batch m's output from W_{m+1} (Z1, GELU,
  Z2 partial, its own cluster exchange slot, LayerNorm, residual, TMA store) and arrives on
  `sync[1]` as soon as its matmuls have read the bf16 state and it holds b1, b2 in registers.
  Warpgroup 0 waits for that before it overwrites them (b2 in step m+1's LayerNorm phase): about
  6 us after the signal it needs, so the wait is normally free. The queries' Q is loaded by
  warpgroup 1 itself (double buffer, the next mini-batch's during this one).
Each warpgroup has its own exchange slot (0: keys, 1: queries). A slot is reused only after the
peer CTA has read it: the reader arrives on a per-slot cluster barrier after its pull and the
writer waits on it before its next push (one step later, so normally already complete).
Same argument/result layout as `kernel_acc_mgpu.build_forward_acc`; outputs and checkpoints equal
v4's arithmetic (the queries use the same bf16 state and biases) unless `early_gelu_grad` or
`late_bias_sums` (bf16-level changes). Options (WsTuningConfig): `prefetch_keys` (v7p),
`early_gelu_grad` (v7e), both (v7pe), `late_bias_sums` (v7pel, slower), and `fresh_update`
with v7pe (v7pef; H200 NC=282 ~9% faster than v7pe), `split_products` with v7pef (v7pefs: the
keys' K W1 and X2 W2 as (hi, lo) products; H200 NC=282 10-15% slower than v7pef, gradients 4.8e-3
vs 2.5e-2), `split_g1` with v7pefs (v7pefsg: G2 W2^T as (hi, lo) products too; H200 8-9% slower than
v7pefs, NC=2750 eta ~1e-6 gradients 9.9e-3 vs 3.9e-2), and `reload_keys` (v7pefsgr: bitwise v7pefsg, K and G2's lo half through SMEM instead of
registers; H200 NC=282 5-6% faster than v7pefsg), `fused_bias_sums` and `fused_b2_sum`
(v7pefsgrbc: b1's and b2's column sums as one cross-warp reduction, the queries' X2 in
registers; bitwise v7pefsgr, H200 2-3% faster), `queries_ek` (v7pefsgrk: -eta K by the queries'
warpgroup; slower) and `f32_state` (v7pefsgrbci, the default of `ttt_mlp_pallas` on the GPU: the
float32 state taken as it is and split in the prologue; bitwise v7pefsgrbc, no XLA glue). H100, NC=282 (NOTES-ttt-mlp.md
"v7"): v7 4.7-4.9 ms, v7pe 4.3-4.7 ms, v4 5.4-5.7 ms. CPU interpret mode runs both warpgroups at cluster 1 (race detection;
tests/pallas_kernels/test_ttt_mlp_ws_kernel.py runs these in child processes with a time limit,
because jax 0.11.2's interpreter can stall them on a busy CPU); cluster 2 is lowered for CUDA
there and run on the GPU.
`python -m pallas_kernels.ttt_mlp.kernel_ws_mgpu` times it against the float32 XLA scan (`kernel_bench`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mgpu_common import (DEFAULT_REDUCTION_SCRATCH, F32_TILE_TRANSFORMS, Phases,
                                        Profile, bf16_tiles, check_cluster, copy_in, f32_tile,
                                        pair_exchange, per_head_kernel)
from pallas_kernels.ttt_mlp.kernel_mgpu import (NH, _col_bcast, _gelu, _gelu_and_grad,
                                                _ln_l2_grad, _ln_stats, _row_bcast, wgmma_chain,
                                                wgmma_chains, wgmma_multi)

KEYS, QUERIES = 0, 1  # warpgroup roles
CS = F = 64


@dataclasses.dataclass(frozen=True)
class WsTuningConfig:
  """Frozen v7 configuration (validated for F = CS = 64, hidden 256)."""

  cluster: int = 2  # CTAs per head; hidden 256 / cluster per CTA
  approx_math: bool = True  # tanh.approx etc. in GELU / LayerNorm (Mosaic GPU approx_math)
  # SMEM bytes for column sums' cross-warp reductions (`mgpu_common.DEFAULT_REDUCTION_SCRATCH`);
  # only the keys' warpgroup runs column sums.
  reduction_scratch: int = DEFAULT_REDUCTION_SCRATCH
  # K, V, eta double-buffered and loaded by the queries' warpgroup: mini-batch m+2's into the
  # buffer the keys released at the end of step m (sync[0]), so the keys' step starts with its
  # inputs in SMEM instead of a synchronous TMA round trip (+16 KiB SMEM).
  prefetch_keys: bool = False
  # v5's idea on the keys' warpgroup: gelu'(K W1_c + b1_c) computed with gelu in the "z1" phase
  # (one tanh) and kept as a bf16 tile (in lo_s, free between the step's checkpoint and its end);
  # the "g1" phase then issues only G2 W2_c^T (no Z1 recompute). Not bitwise v4: gelu' in bf16.
  early_gelu_grad: bool = False
  # v4l's idea on the keys' warpgroup: b1's two column sums (cross-warp reductions) run while the
  # update's wgmmas are in flight, from the bf16 G1 tiles they read, instead of in the "g1" phase.
  # Not bitwise v7: b1 from the bf16 G1.
  late_bias_sums: bool = False
  # The updates' products into fresh (zero) accumulators, then added to the carried state in
  # float32 (W1's, then W2's: 64 more registers at a time), instead of accumulated into it by
  # the tensor cores, which align each product to the accumulator's exponent and truncate: a
  # product ~2^-19 of W keeps ~8 bits, and the truncation biases every update toward zero
  # (NOTES-ttt-mlp.md "Update truncation").
  fresh_update: bool = False
  # The keys' K W1 and X2 W2 with the state (and X2) as bf16 (hi, lo) pairs: K W1h + K W1l and
  # X2h W2h + X2h W2l + X2l W2h (X2l from registers), the rest bf16 as before. The state's lo
  # halves stay current in lo_s (gelu' then lives in the G1 tiles). The trajectory's rounding
  # is what decides the gradients' error on ill-conditioned heads: emulated, these two products
  # alone take it from 2.5e-2 to 3.4e-4 (NOTES-ttt-mlp.md, `ttt_mlp_rounding` split_z).
  split_products: bool = False
  # With split_products and early_gelu_grad: G2 W2^T as G2h W2h^T + G2h W2l^T + G2l W2h^T too (G2l
  # from registers; v7pefsg). Emulated on the eta ~1e-6, NC=2750 head that v7pefs misses by 3.9e-2
  # on the GPU: the trajectory's error 3.0e-2 (split_z) -> 8.5e-4 (split_zg; NOTES-ttt-mlp.md).
  split_g1: bool = False
  # The keys' K re-read from its SMEM tile for the LayerNorm's target V - K instead of held in
  # registers from the step's start (32 registers live across z1 / z2 / xchg), and with split_g1
  # G2's lo half through K's tile (free after that read until the step's end) instead of
  # registers: the same values (bitwise v7pefsg), less register pressure (v7pefsgr).
  reload_keys: bool = False
  # b1's column sums (sum_j eta_j G1[j, :]) of all the CTA's hidden chunks as ONE cross-warp
  # reduction of the [64, 64 NL] concatenation instead of one per chunk, the chunks' shuffles
  # interleaved (each column's sum in the same order: bitwise the same), with the reduction scratch
  # scaled so that it takes the rounds of one chunk's sum (`scratch_bytes`). The SMEM comes from
  # the queries' X2 tiles, which this moves to registers (wgmma's lhs from registers; the same
  # bf16 values).
  fused_bias_sums: bool = False
  # With fused_bias_sums: b2's column sum (sum_j -eta_j G2[j, :]) joins the same reduction in the
  # "g1" phase instead of its own in "ln" (-eta G2 kept in registers across "g1_mm").
  fused_b2_sum: bool = False
  # With prefetch_keys: the next mini-batch's -eta K tile written by the queries' warpgroup at the
  # start of its step (K and eta are in SMEM two steps ahead) instead of by the keys at the start
  # of theirs, before Z1's wgmmas. The keys' wait for the queries (sync[1], before "ln") orders it
  # before the update reads it and before K's tile is reused; the keys write mini-batch 0's.
  queries_ek: bool = False
  # The initial state taken as the caller's float32 arrays, one per head (W1 [H, F, 4F], b1
  # [H, 4, 64], W2 [H, 4, 64, F], b2 [H, F], gamma / beta [H, F]; row bh reads head bh % H),
  # split into bf16 (hi, lo) in the keys' prologue instead of by XLA ops before the launch: the
  # forward is then one launch with no glue (the split's four small fusions: H100, interleaved
  # A/Bs, waited -0.6 to -1%, in flight equal; NOTES-ttt-mlp.md). The same values as the split outside (round to
  # nearest even both ways): bitwise the variant without it. The float32 tiles are staged through
  # the exchange's receive tiles (free before the cluster's first meeting; cluster 1: two tiles
  # of their own).
  f32_state: bool = False
  # False: no checkpoints written and none returned (the output alone): a forward that nothing
  # differentiates (inference) skips the state's HBM copies (at H=48, group 16: ~6 KiB per
  # mini-batch and head, 2.1 GiB at NC=5500) and their stores on the keys' chain. Not a variant
  # letter: `ttt_mlp.PRIMAL_CHECKPOINTS = False` sets it for the non-differentiated call (H100:
  # bitwise the same output, but 1.7% slower in flight at NC=1000: ptxas moves its spills).
  checkpoints: bool = True
  # With split_products: X2's lo halves (the register lhs of z2's X2l W2h) stored to SMEM in "z1"
  # and read by z2's wgmma from there, instead of held in registers from z1 to z2 (32 per thread
  # at cluster 2). The tiles are G2's and -eta G2's (free from the previous step's waited update
  # to this step's "ln"; at cluster 1, NL = 4, two more of their own). The same bf16 values:
  # bitwise the variant without it. The SASS of v7pefsgrbci reloads 17 spilled registers just
  # before that product (RESULTS.md, sixteenth session).
  x2_lo_smem: bool = False
  # With fresh_update: the update's products one chunk at a time (a wgmma group and its wait per
  # chunk, added to the state before the next is issued) instead of W1's chunks, then W2's, at
  # once: 32 more live registers instead of 64 on top of the 128 of the carried state, where the
  # SASS shows the update's spills (STL 24, LDL 54 per step). The same products and additions.
  chunked_update: bool = False
  # With chunked_update: chunk j's bf16 (hi, lo) split and SMEM stores (W_{m+1} for the queries
  # and the next step) while chunk j + 1's update product is in flight, instead of all chunks'
  # stores after the last product's wait: the stores leave the chain except the last chunk's.
  # The same values (bitwise the variant without it).
  pipelined_store: bool = False
  # The keys' step loads gamma, beta and b2 (three [64] column vectors: 16 registers each per
  # thread) where they are used ("xchg", "ln", the b2 write) and b1's chunks again at their write,
  # instead of at the step's start (gamma, beta, b2: live across z1 and z2, where the SASS shows
  # spills) and in "g1_ew" (held over the fused column sum). Loads cannot move across the
  # step's barriers and wgmma fences, so ptxas keeps them where they are written. The same SMEM
  # values in the same layout: bitwise the variant without it.
  late_loads: bool = False
  # With reload_keys: -eta K (ek_s, read only by the update) written between the push of the
  # z2 partial to the peer CTA and the wait for the peer's, i.e. in the exchange's latency,
  # instead of at the step's start ahead of z1 (K's tile read there for it alone). At cluster 1
  # (no exchange) it is written at the same point. The same values: bitwise the variant without it.
  ek_in_exchange: bool = False
  # With x2_lo_smem: z1 and z2 software-pipelined over the hidden chunks. All chunks' K W1
  # products are issued, then per chunk c: wait for chunk c's alone (`wait_n`: later chunks' and
  # earlier z2 groups stay in flight), its gelu / gelu' / X2 tiles, and chunk c's three z2
  # products issued into the one Z2 accumulator. So chunk c's elementwise work runs while chunk
  # c + 1's K W1 and chunk c - 1's z2 products are on the tensor cores, instead of every chunk's
  # gelu after all of z1 and z2 after all gelu. The same products, accumulated in the same order:
  # bitwise the variant without it.
  pipelined_z: bool = False
  # With split_products and fresh_update: W2's float32 state carried in SMEM as three bf16
  # tiles per chunk, hi (w2h), lo (lo_s) and a third "lo2" (16 KiB more at cluster 2: it fits the
  # 227 KiB; W1's needs lean_buffers), instead of 64 registers per thread across the step. A float32
  # w is exactly hi + lo + lo2 (hi = bf16(w), lo = bf16(w - hi), lo2 = bf16(w - hi - lo): each
  # difference is exact and the last has at most 8 significant bits), so the update reads the same
  # float32 state back: bitwise the variant without it. The update pays three tile loads and one
  # more store per W2 chunk; every other phase gets the 64 registers (the keys' spills).
  w2_smem: bool = False
  # With prefetch_keys, without queries_ek: Q and V single-buffered (16 KiB less SMEM at cluster
  # 2, the room w1_smem needs). The queries load Q(j + 1) when their step j is done with Q's tile
  # (its output stored), ~8 us before they need it; the keys load V(m + 1) right after step m's
  # LayerNorm has read V(m), ~14 us before step m + 1's reads it. The same values.
  lean_buffers: bool = False
  # w2_smem's idea for W1 too (needs lean_buffers at cluster 2 for the SMEM): the whole float32
  # state out of registers, 128 of them per thread freed. Bitwise the variant without it.
  w1_smem: bool = False
  # With fused_b2_sum, without queries_ek: the keys wait for the queries' sync[1] (they have
  # read W_m, b1_m, b2_m) right before the step's first write to them, b2 and b1 after the fused
  # column sum in "g1_sum", instead of before "ln" (the profile's "wait_q", 0.41 us per step):
  # ~3 us more slack for the queries. Between the two points the keys only read the shared
  # state. The same values.
  late_wait_q: bool = False
  # The LayerNorm's target V - K (K re-read with reload_keys) computed between the push of the
  # z2 partial and the wait for the peer's, like ek_in_exchange, instead of in "ln": 32 more
  # registers live over the pull (meant for w1_smem / w2_smem, which free 64-128). The same values.
  early_target: bool = False

  def __post_init__(self):
    check_cluster(self.cluster)
    if self.split_products and self.late_bias_sums:
      raise ValueError("split_products is built without late_bias_sums")
    if self.split_g1 and not (self.split_products and self.early_gelu_grad):
      raise ValueError("split_g1 needs split_products and early_gelu_grad")
    if self.fused_bias_sums and (not self.early_gelu_grad or self.late_bias_sums):
      raise ValueError("fused_bias_sums needs early_gelu_grad, without late_bias_sums")
    if self.fused_b2_sum and not self.fused_bias_sums:
      raise ValueError("fused_b2_sum needs fused_bias_sums")
    if self.queries_ek and not self.prefetch_keys:
      raise ValueError("queries_ek needs prefetch_keys")
    if self.x2_lo_smem and not self.split_products:
      raise ValueError("x2_lo_smem needs split_products")
    if self.chunked_update and not self.fresh_update:
      raise ValueError("chunked_update needs fresh_update")
    if self.pipelined_store and (not self.chunked_update or self.late_bias_sums):
      raise ValueError("pipelined_store needs chunked_update, without late_bias_sums")
    if self.ek_in_exchange and (not self.reload_keys or self.queries_ek):
      raise ValueError("ek_in_exchange needs reload_keys, without queries_ek")
    if self.pipelined_z and not self.x2_lo_smem:
      raise ValueError("pipelined_z needs x2_lo_smem")
    if self.w2_smem and not (self.split_products and self.fresh_update):
      raise ValueError("w2_smem needs split_products and fresh_update")
    if self.lean_buffers and (not self.prefetch_keys or self.queries_ek):
      raise ValueError("lean_buffers needs prefetch_keys, without queries_ek")
    if self.w1_smem and not (self.w2_smem and (self.lean_buffers or self.cluster == 1)):
      raise ValueError("w1_smem needs w2_smem, and lean_buffers at cluster 2 (SMEM)")
    if self.late_wait_q and (not self.fused_b2_sum or self.queries_ek):
      raise ValueError("late_wait_q needs fused_b2_sum, without queries_ek")

  @property
  def scratch_bytes(self) -> int:
    """SMEM bytes for cross-warp reductions: `reduction_scratch`, times the number of [64, 64]
    parts of the fused sum with fused_bias_sums (2, or 3 with fused_b2_sum). A round of a column sum holds
    1 KiB per 8 columns, so the fused sum takes as many rounds of 2 warpgroup barriers as one
    part alone did. (More scratch, fewer rounds: H200, b with 16 KiB spilled more and was slower.)
    With w2_smem one part fewer (at cluster 2 its 16 KiB of lo2 tiles leave 1.2 KiB too little
    otherwise): the fused sum takes more rounds, each column summed in the same order."""
    parts = (NH // self.cluster if self.fused_bias_sums else 1) + self.fused_b2_sum
    return max(parts - self.w2_smem, 1) * self.reduction_scratch

  @classmethod
  def from_variant(cls, variant: str, **kwargs) -> "WsTuningConfig":
    """The config a variant name spells ("v7" + letters: p prefetch_keys, e early_gelu_grad,
    l late_bias_sums, f fresh_update, s split_products, g split_g1, r reload_keys, b
    fused_bias_sums, c fused_b2_sum, k queries_ek, i f32_state, x x2_lo_smem, u chunked_update,
    o pipelined_store, d late_loads, h ek_in_exchange, z pipelined_z, w w2_smem, q lean_buffers,
    y w1_smem, j late_wait_q, t early_target; e.g. "v7pefsg")."""
    letters = dict(p="prefetch_keys", e="early_gelu_grad", l="late_bias_sums", f="fresh_update",
                   s="split_products", g="split_g1", r="reload_keys", b="fused_bias_sums",
                   c="fused_b2_sum", k="queries_ek", i="f32_state", x="x2_lo_smem",
                   u="chunked_update", o="pipelined_store",
                   d="late_loads", h="ek_in_exchange", z="pipelined_z", w="w2_smem",
                   q="lean_buffers", y="w1_smem", j="late_wait_q", t="early_target")
    if not variant.startswith("v7") or any(ch not in letters for ch in variant[2:]):
      raise ValueError(f"variant {variant!r}: 'v7' followed by letters of {''.join(letters)}")
    return cls(**{name: ch in variant[2:] for ch, name in letters.items()}, **kwargs)


def build_forward_ws(BH: int, NC: int, group: int, ln_eps: float, *,
                     config: WsTuningConfig = WsTuningConfig(), interpret=None,
                     profile: Profile | None = None):
  """Returns f(q, k, v, eta, gamma, beta, w1h, w1l, b1, w2h, w2l, b2) -> (out, ckpts): the layout
  of `kernel_acc_mgpu.build_forward_acc` (q, k, v [BH, NC, 64, 64] bf16, eta [BH, NC, 64] f32,
  state chunks [BH, 4, 64, 64] bf16 (hi, lo), b1 [BH, 4, 64], b2 [BH, 64]; checkpoints with an
  [NG] axis after BH, the state before mini-batch g * group). With `config.f32_state`:
  f(q, k, v, eta, gamma, beta, w1, b1, w2, b2), the per-head float32 parameters as they are
  (gamma / beta / b2 [H, 64], w1 [H, 64, 256], b1 [H, 4, 64], w2 [H, 4, 64, 64]; H divides BH).
  Without `config.checkpoints` the result is (out,) alone."""
  C = config.cluster
  NL = NH // C  # hidden chunks of 64 per CTA
  NG = -(-NC // group)
  bf16, f32 = jnp.bfloat16, jnp.float32
  shp = (64, 64)
  tile = bf16_tiles
  red0 = plgpu.Layout.WGMMA.reduce(0)  # [64] over columns
  red1 = plgpu.Layout.WGMMA.reduce(1)  # [64] over rows
  row = lambda v: _row_bcast(v, shp)
  col = lambda v: _col_bcast(v, shp)
  mm_multi = functools.partial(wgmma_multi, shape=shp)

  def exact_dot(a, b):
    """a @ b of bf16 values in float32, exact products: interpret mode's stand-in for a wgmma
    whose lhs is a register value (no interpret rule in jax 0.11.2)."""
    return jnp.dot(a.astype(f32), b.astype(f32), precision=lax.Precision.HIGHEST)

  def body(q_ref, k_ref, v_ref, eta_ref, g_ref, bt_ref, *refs):
    if config.f32_state:  # the float32 state as given (one row per head)
      (w1_ref, b1_ref, w2_ref, b2_ref), refs = refs[:4], refs[4:]
    else:  # bf16 (hi, lo) chunks per row
      (w1h_ref, w1l_ref, b1_ref, w2h_ref, w2l_ref, b2_ref), refs = refs[:6], refs[6:]
    if config.checkpoints:
      (o_ref, cw1h, cw1l, cb1, cw2h, cw2l, cb2), refs = refs[:7], refs[7:]
    else:
      (o_ref,), refs = refs[:1], refs[1:]
    (q_sb, k_sb, v_sb, eta_sb, ek_s, g2_s, eg2_s, g1_s, ex2_s, x_s, w1h, w2h, lo_s,
     b1_s, b2_s, gam_s, bet_s, bars, qbars, sync, both, *rest) = refs
    # Keys' warpgroup only: k/v/eta, -eta K (ek_s), G2, -eta G2, G1 and the keys' X2 per chunk,
    # lo_s (the state's lo halves: init and checkpoints), bars (its TMA loads).
    # Queries' warpgroup only: q_sb (Q double buffer, also the output tile), the queries' X2 (x_s),
    # qbars. Shared: W1/W2 bf16 (w1h, w2h), b1_s, b2_s (written by keys, read by queries between
    # sync[0] and sync[1]), gamma/beta (written before the loop, read-only after).
    bh = lax.axis_index("bh")
    r = lax.axis_index("c") if C > 1 else 0
    w = lax.axis_index("wg")
    c0 = r * NL  # first global hidden chunk of this CTA

    def on_rank0(fn):
      """fn() on the cluster's first CTA only (always at cluster 1)."""
      if C == 1:
        fn()
      else:
        pl.when(r == 0)(fn)

    if config.w1_smem:  # W1's third bf16 part (appended last)
      w1ll, rest = rest[-1], rest[:-1]
    if config.w2_smem:  # W2's third bf16 part (appended after x2l_tiles)
      w2ll, rest = rest[-1], rest[:-1]
    if config.x2_lo_smem and NL > 2:  # (cluster 1: X2 lo tiles of its own beyond G2's, -eta G2's)
      x2l_extra, rest = rest[-1], rest[:-1]
    kbars = rest[0] if config.prefetch_keys else None  # [3 slot + i]: K, V, eta of buffer slot
    xch = rest[1:] if config.prefetch_keys else rest
    if C > 1:
      recv0, recv1, rbar0, rbar1, cbar = xch
      stage = (recv0, recv1)  # (f32_state: the prologue's staging tiles)
    elif config.f32_state:
      stage = (xch[0].at[0], xch[0].at[1])
    push, pull = pair_exchange(C, r, ((recv0, rbar0), (recv1, rbar1)) if C > 1 else None)

    def exchange(x, slot, first, during=None):
      """All-reduce of this CTA's [64, 64] f32 partial over the cluster on `slot`: wait until the
      peer has read the slot's previous content (its arrival on cbar[1 + slot] after its pull),
      push, [`during()`: work independent of the peer's partial], pull, then signal the same to
      the peer. Identity at cluster 1 (`during()` still runs)."""
      if C == 1:
        if during is not None:
          during()
        return x

      @pl.when(jnp.logical_not(first))
      def _():
        plgpu.barrier_wait(cbar.at[1 + slot])
      push(x, slot)
      if during is not None:
        during()
      y = pull(x, slot)
      plgpu.barrier_arrive(cbar.at[1 + slot])
      return y

    def load_keys(m, slot, with_v=not config.lean_buffers):
      """TMA of mini-batch m's K, V, eta into buffer `slot` (prefetch_keys; kbars 3 slot + i).
      lean_buffers: V alone by `load_v`."""
      for i, (src, dst) in enumerate(((k_ref, k_sb), (v_ref, v_sb), (eta_ref, eta_sb))):
        if i != 1 or with_v:
          plgpu.copy_gmem_to_smem(src.at[bh, m], dst.at[slot], kbars.at[3 * slot + i])

    def load_v(m):
      """lean_buffers: TMA of mini-batch m's V into its one buffer (kbars[1])."""
      plgpu.copy_gmem_to_smem(v_ref.at[bh, m], v_sb.at[0], kbars.at[1])

    # ------------------------------------------------------------------ keys' warpgroup
    def initial_state_split():
      """f32_state: this CTA's chunks of the float32 state, staged two tiles at a time, split
      into bf16 (hi, lo) in SMEM (w1h / w2h, lo_s); returns hi + lo in float32 (what the split
      state means), with b1, b2, gamma and beta loaded on the first round's barriers."""
      hp = bh % g_ref.shape[0]  # this row's head
      params = [(b1_ref.at[hp, pl.ds(c0, NL)], b1_s), (b2_ref.at[hp], b2_s),
                (g_ref.at[hp], gam_s), (bt_ref.at[hp], bet_s)]
      tiles = ([(w1_ref.at[hp, :, pl.ds((c0 + c) * 64, 64)], w1h.at[c], lo_s.at[c])
                for c in range(NL)]
               + [(w2_ref.at[hp, c0 + c], w2h.at[c], lo_s.at[NL + c]) for c in range(NL)])
      vals = []
      for i in range(0, len(tiles), 2):
        pair = tiles[i:i + 2]
        copy_in((params if i == 0 else []) + [(src, stage[j]) for j, (src, _, _) in
                                              enumerate(pair)], bars)
        for j, (_, hi_ref, lo_ref) in enumerate(pair):
          x = plgpu.load(stage[j], layout=plgpu.Layout.WGMMA)  # [64, 64] f32
          hi = x.astype(bf16)
          lo = (x - hi.astype(f32)).astype(bf16)
          hi_ref[...] = hi
          lo_ref[...] = lo
          vals.append(hi.astype(f32) + lo.astype(f32))
        plgpu.commit_smem()  # staging read (and hi, lo visible to wgmma / TMA) before reuse
      return tuple(vals[:NL]), tuple(vals[NL:])

    def keys():
      if config.f32_state:
        w1_0, w2_0 = initial_state_split()
      else:
        copies = ((w1h_ref.at[bh, pl.ds(c0, NL)], w1h), (w1l_ref.at[bh, pl.ds(c0, NL)],
                                                         lo_s.at[pl.ds(0, NL)]),
                  (w2h_ref.at[bh, pl.ds(c0, NL)], w2h), (w2l_ref.at[bh, pl.ds(c0, NL)],
                                                         lo_s.at[pl.ds(NL, NL)]),
                  (b1_ref.at[bh, pl.ds(c0, NL)], b1_s), (b2_ref.at[bh], b2_s),
                  (g_ref.at[bh], gam_s), (bt_ref.at[bh], bet_s))
        copy_in(copies, bars)
        as_f32 = lambda hi, lo: plgpu.layout_cast(hi[...].astype(f32) + lo[...].astype(f32),
                                                  plgpu.Layout.WGMMA)
        w1_0 = tuple(as_f32(w1h.at[c], lo_s.at[c]) for c in range(NL))
        w2_0 = tuple(as_f32(w2h.at[c], lo_s.at[NL + c]) for c in range(NL))
      if C > 1:  # every CTA's barriers initialised before any push (the queries' pushes come
        plgpu.barrier_arrive(cbar.at[0])  # after sync[0], i.e. after this)
        plgpu.barrier_wait(cbar.at[0])
      if config.prefetch_keys:  # mini-batches 0 and 1; the queries load m + 2 after step m
        load_keys(0, 0, with_v=True)
        if NC > 1:
          load_keys(1, 1)

      def write_checkpoint(gi, w1, w2):
        """(hi, lo) bf16 of this CTA's chunks + biases to HBM (state before mini-batch gi*group)."""
        for c in range(NL):  # (w1_smem / w2_smem: lo_s holds it already: split_products)
          if not config.w1_smem:
            lo_s[c] = (w1[c] - w1h[c].astype(f32)).astype(bf16)
          if not config.w2_smem:
            lo_s[NL + c] = (w2[c] - w2h[c].astype(f32)).astype(bf16)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(w1h, cw1h.at[bh, gi, pl.ds(c0, NL)])
        plgpu.copy_smem_to_gmem(lo_s.at[pl.ds(0, NL)], cw1l.at[bh, gi, pl.ds(c0, NL)])
        plgpu.copy_smem_to_gmem(w2h, cw2h.at[bh, gi, pl.ds(c0, NL)])
        plgpu.copy_smem_to_gmem(lo_s.at[pl.ds(NL, NL)], cw2l.at[bh, gi, pl.ds(c0, NL)])
        plgpu.copy_smem_to_gmem(b1_s, cb1.at[bh, gi, pl.ds(c0, NL)])
        on_rank0(lambda: plgpu.copy_smem_to_gmem(b2_s, cb2.at[bh, gi]))
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

      in_smem = lambda j: config.w1_smem if j < NL else config.w2_smem  # (w1_smem / w2_smem)
      lo2_tile = lambda j: (w1ll if j < NL else w2ll).at[j % NL]

      def store_state(j, w):
        """State chunk j (W1's chunk j, or W2's chunk j - NL) as bf16 hi (and lo) to SMEM."""
        h = w.astype(bf16)
        (w1h if j < NL else w2h)[j % NL] = h
        if config.split_products:  # the next step's lo halves (the checkpoint reads them too)
          r = w - h.astype(f32)
          lo = r.astype(bf16)
          lo_s[j] = lo
          if in_smem(j):  # the rest, exactly (w1_smem / w2_smem)
            lo2_tile(j)[...] = (r - lo.astype(f32)).astype(bf16)

      def smem_state(j):
        """w1_smem / w2_smem: state chunk j in float32 from its three bf16 tiles (exactly)."""
        part = lambda ref: plgpu.load(ref, layout=plgpu.Layout.WGMMA).astype(f32)
        hi = (w1h if j < NL else w2h).at[j % NL]
        return (part(hi) + part(lo_s.at[j])) + part(lo2_tile(j))

      def update_state(w1, w2, during=None):
        """W1_c += (-eta K)^T G1_c, W2_c += X2_c^T (-eta G2), accumulated into the carried state;
        `during()` runs after the wgmmas are issued, before their wait (interpret mode has no
        wgmma rule under `run_state`: fresh products, added, as with `fresh_update`).
        With pipelined_store the new state is also stored (`store_state`). A state held in SMEM
        (w1_smem / w2_smem) is read back where its update starts and returned as ()."""
        def pairs():  # (made inside the traced function: see kernel_acc_mgpu.update_state)
          return ([[(ek_s.T, g1_s.at[c])] for c in range(NL)]
                  + [[(ex2_s.at[c].T, eg2_s)] for c in range(NL)])
        old = lambda j: smem_state(j) if in_smem(j) else w1[j] if j < NL else w2[j - NL]
        carried = lambda ws, j0: () if in_smem(j0) else tuple(ws)
        if config.pipelined_store:  # chunk j + 1's product in flight while chunk j is stored
          ps, new = pairs(), []
          for j in range(2 * NL):
            def fn(acc, j=j):
              for a, b in ps[j]:
                plgpu.wgmma(acc, a, b)
              if j:
                store_state(j - 1, new[j - 1])
              return old(j), acc[...]
            w, prod = pl.run_scoped(fn, plgpu.ACC(shp, f32))
            new.append(w + prod)
          store_state(2 * NL - 1, new[-1])
          return carried(new[:NL], 0), carried(new[NL:], NL)
        now = lambda j0: tuple(old(j) for j in range(j0, j0 + NL))  # W1's (0) or W2's (NL)
        if config.chunked_update:  # one chunk's product at a time (its own wait)
          ps = pairs()
          w1 = tuple(a + wgmma_chains([p], shp)[0] for a, p in zip(now(0), ps[:NL]))
          if during is not None:
            during()
          return w1, tuple(a + wgmma_chains([p], shp)[0] for a, p in zip(now(NL), ps[NL:]))
        if interpret is not None or config.fresh_update:
          ps = pairs()
          w1 = tuple(a + x for a, x in zip(now(0), wgmma_chains(ps[:NL], shp)))
          if during is not None:
            during()
          return w1, tuple(a + x for a, x in zip(now(NL), wgmma_chains(ps[NL:], shp)))

        def fn(accs):
          for acc, ps in zip(accs[0] + accs[1], pairs()):
            for a, b in ps:
              plgpu.wgmma(acc, a, b)
          if during is not None:
            during()
        return pl.run_state(fn)((tuple(plgpu.ACC.init(x) for x in w1),
                                 tuple(plgpu.ACC.init(x) for x in w2)))

      def step(m, carry):
        """Mini-batch m's state update W_m -> W_{m+1} (keys only)."""
        w1, w2 = carry  # NL x [64, 64] f32 each: W1[:, chunk], W2[chunk, :]
        ph = Phases()
        ph("ckpt")
        if config.checkpoints:
          @pl.when(m % group == 0)
          def _():
            write_checkpoint(m // group, w1, w2)

        ph("load")
        if config.prefetch_keys:
          slot = m % 2
          for i in (0, 2) if config.lean_buffers else range(3):  # (lean: V's at "ln")
            plgpu.barrier_wait(kbars.at[3 * slot + i])
        else:
          slot = 0
          copy_in([(src.at[bh, m], dst.at[0]) for src, dst in ((k_ref, k_sb), (v_ref, v_sb),
                                                               (eta_ref, eta_sb))], bars)
        k_s, eta_s = k_sb.at[slot], eta_sb.at[slot]
        v_s = v_sb.at[0 if config.lean_buffers else slot]
        eta_c = plgpu.load(eta_s, layout=red1)  # [64] over rows j
        params = lambda: tuple(plgpu.load(r, layout=red0) for r in (gam_s, bet_s, b2_s))
        gam, bet, b2v = (None,) * 3 if config.late_loads else params()  # [64] over columns f
        kf = (None if (config.queries_ek or config.ek_in_exchange) and config.reload_keys
              else k_s[...].astype(f32))

        def write_ek():  # -diag(eta) K (queries_ek: the queries' warpgroup writes m >= 1's)
          kk = k_s[...].astype(f32) if kf is None else kf
          ek_s[...] = (-col(eta_c) * kk).astype(bf16)
        if config.queries_ek:
          pl.when(m == 0)(write_ek)
        elif not config.ek_in_exchange:
          write_ek()

        # ---- (1)-(3): Z2 = gelu(K W1 + b1) W2 + b2, all-reduced over the hidden shards
        ph("z1")
        # early_gelu_grad: gelu'(K W1_c + b1_c) into gp_s(c) = lo_s.at[c], free from the step's
        # checkpoint (its TMA reads waited) to its end; written and read back in the WGMMA layout
        # (every thread its own elements). The Z1 and b1 are those "g1" would recompute.
        # (split_products: lo_s holds the state's lo halves, so gelu' goes to the G1 tiles, free
        # from the previous step's waited update to this step's "g1" phase, which reads chunk c's
        # gelu' before it writes chunk c's G1 over it.)
        gp_s = (lambda c: g1_s.at[c]) if config.split_products else (lambda c: lo_s.at[c])
        x2_lo = []  # split_products: X2's lo halves, bf16 in registers (wgmma's lhs) or tiles
        x2l_s = lambda c: (g2_s, eg2_s)[c] if c < 2 else x2l_extra.at[c - 2]  # (x2_lo_smem)

        def x2_chunk(c, zkc):
          """Chunk c's X2 = gelu(K W1_c + b1_c) to its tiles (and gelu', X2's lo half)."""
          zb = zkc + row(plgpu.load(b1_s.at[c], layout=red0))
          if config.early_gelu_grad:
            x2k, gpk = _gelu_and_grad(zb)  # one tanh
            gp_s(c)[...] = gpk.astype(bf16)
          else:
            x2k = _gelu(zb)
          x2h = x2k.astype(bf16)
          ex2_s[c] = x2h
          if config.x2_lo_smem:
            x2l_s(c)[...] = (x2k - x2h.astype(f32)).astype(bf16)
          elif config.split_products:
            x2_lo.append((x2k - x2h.astype(f32)).astype(bf16))

        # split_products: chunk c's z2 products X2h W2h + X2h W2l + X2l W2h in chain order, X2l
        # from its tile (x2_lo_smem) or registers; interpret mode has no rule for a register lhs,
        # so there X2l W2h is added by jnp after the chain (`x2l_terms`), for every variant alike
        x2l = lambda c: x2l_s(c) if config.x2_lo_smem else x2_lo[c]
        z2_pairs = lambda c: [(ex2_s.at[c], w2h.at[c]), (ex2_s.at[c], lo_s.at[NL + c])] + (
            [(x2l(c), w2h.at[c])] if interpret is None else [])
        x2l_terms = lambda pk: pk if interpret is None else pk + sum(
            exact_dot(x2l(c)[...], w2h[c]) for c in range(NL))
        if config.pipelined_z:
          def z1_z2(*accs):
            zacc, acc2 = accs[:NL], accs[NL]
            for c in range(NL):  # K W1h + K W1l per chunk: two wgmma groups each
              plgpu.wgmma(zacc[c], k_s, w1h.at[c])
              plgpu.wgmma(zacc[c], k_s, lo_s.at[c])
            for c in range(NL):  # groups issued after chunk c's may stay in flight
              later = 2 * (NL - 1 - c) + len(z2_pairs(0)) * c
              x2_chunk(c, plgpu.wgmma_accumulator_load(zacc[c], wait_n=later))
              plgpu.commit_smem()
              for a, b in z2_pairs(c):
                plgpu.wgmma(acc2, a, b)
            return acc2[...]
          pk = x2l_terms(pl.run_scoped(z1_z2, *[plgpu.ACC(shp, f32) for _ in range(NL + 1)]))
        else:
          if config.split_products:  # K exact in bf16: K W1h + K W1l
            zk = wgmma_chains([[(k_s, w1h.at[c]), (k_s, lo_s.at[c])] for c in range(NL)], shp)
          else:
            zk = mm_multi([(k_s, w1h.at[c]) for c in range(NL)])
          for c in range(NL):
            x2_chunk(c, zk[c])
          plgpu.commit_smem()
          ph("z2")
          if config.split_products:
            pk = x2l_terms(wgmma_chain([pr for c in range(NL) for pr in z2_pairs(c)], shp))
          else:
            pk = wgmma_chain([(ex2_s.at[c], w2h.at[c]) for c in range(NL)], shp)
        ph("xchg")
        def ln_target():
          """The LayerNorm's target V - K of this step (V's arrival waited with lean_buffers)."""
          if config.lean_buffers:
            plgpu.barrier_wait(kbars.at[1])  # V(m)
          kk = (plgpu.load(k_s, layout=plgpu.Layout.WGMMA).astype(f32)  # (K again from SMEM, in
                if config.reload_keys else kf)  # the layout and threads it was read in)
          return v_s[...].astype(f32) - kk

        early = []  # (early_target: the target, computed in the exchange)

        def in_exchange():  # work that needs no peer partial, in the exchange's latency
          if config.ek_in_exchange:
            write_ek()
          if config.early_target:
            early.append(ln_target())
        z2 = exchange(pk, 0, m == 0, during=in_exchange
                      if config.ek_in_exchange or config.early_target else None)
        if config.late_loads:  # b2_m (the keys write b2_{m+1} after sync[1])
          b2v = plgpu.load(b2_s, layout=red0)
        z2 = z2 + row(b2v)
        # ---- the queries' warpgroup has read W_m, b1_m, b2_m (mini-batch m-1's output): they
        # may be overwritten from here on
        def wait_q():
          @pl.when(m > 0)
          def _():
            plgpu.barrier_wait(sync.at[1])

        if not config.late_wait_q:
          ph("wait_q")
          wait_q()

        # ---- (4)-(6): fused LayerNorm + L2 backward (replicated on every CTA)
        ph("ln")
        target = early[0] if config.early_target else ln_target()
        if config.late_loads:
          gam, bet, _ = params()
        g2 = _ln_l2_grad(z2, target, gam, bet, ln_eps)
        g2h = g2.astype(bf16)
        g2_s[...] = g2h
        g2_lo = (g2 - g2h.astype(f32)).astype(bf16) if config.split_g1 else None  # registers
        if config.split_g1 and config.reload_keys:  # ... or K's tile (each thread its own elements)
          k_s[...] = g2_lo
          g2_lo = k_s
        eg2 = -col(eta_c) * g2
        eg2_s[...] = eg2.astype(bf16)
        if not config.fused_b2_sum:
          b2_s[...] = b2v + jnp.sum(eg2, axis=0)
        plgpu.commit_smem()
        if config.lean_buffers:  # V(m) was read (the commit's barrier): V(m + 1) into its tile
          @pl.when(m + 1 < NC)
          def _():
            load_v(m + 1)
        # ---- (7): G1 = (G2 W2^T) * gelu'(Z1) per local chunk, with the old state
        # (finer phases: g1_mm the waited wgmmas, g1_ew the elementwise work, g1_sum b1's column
        # sums, cross-warp reductions)
        if config.early_gelu_grad:  # gelu' from the "z1" phase: only G2 W2_c^T, one wait
          ph("g1_mm")
          if config.split_g1 and interpret is not None and not config.reload_keys:  # (register
            # lhs, no interpret rule: G2l W2h^T by jnp)
            gws = wgmma_chains([[(g2_s, w2h.at[c].T), (g2_s, lo_s.at[NL + c].T)]
                                for c in range(NL)], shp)
            gws = [gw + exact_dot(g2_lo, w2h[c].T) for c, gw in enumerate(gws)]
          elif config.split_g1:  # G2h W2h^T + G2h W2l^T + G2l W2h^T (W2l: the state's lo in lo_s;
            # G2l in registers, or with reload_keys in K's tile)
            gws = wgmma_chains([[(g2_s, w2h.at[c].T), (g2_s, lo_s.at[NL + c].T),
                                 (g2_lo, w2h.at[c].T)] for c in range(NL)], shp)
          else:
            gws = mm_multi([(g2_s, w2h.at[c].T) for c in range(NL)])
        g1s, b1cs = [], []  # fused_bias_sums: the chunks' G1 (f32) and b1, summed after the loop
        for c in range(NL):
          if config.early_gelu_grad:
            ph("g1_ew")
            b1c = (None if config.late_loads and config.fused_bias_sums  # (loaded at its write)
                   else plgpu.load(b1_s.at[c], layout=red0))
            gw = gws[c]
            gp = plgpu.load(gp_s(c), layout=plgpu.Layout.WGMMA).astype(f32)
          else:
            ph("g1_mm")
            z1, gw = mm_multi([(k_s, w1h.at[c]), (g2_s, w2h.at[c].T)])
            ph("g1_ew")
            b1c = plgpu.load(b1_s.at[c], layout=red0)
            _, gp = _gelu_and_grad(z1 + row(b1c))
          g1 = gw * gp
          g1_s[c] = g1.astype(bf16)
          if config.fused_bias_sums:
            g1s.append(g1)
            b1cs.append(b1c)
          elif not config.late_bias_sums:
            ph("g1_sum")
            b1_s[c] = b1c - jnp.sum(col(eta_c) * g1, axis=0)
        if config.fused_bias_sums:  # one reduction: [64, 64 n] -> [64 n], then per chunk
          ph("g1_sum")
          parts = ([eg2] if config.fused_b2_sum else []) + [col(eta_c) * g for g in g1s]
          sums = jnp.sum(jnp.concatenate(parts, axis=1), axis=0)
          off = 64 if config.fused_b2_sum else 0
          if config.late_wait_q:  # the first write to what the queries read
            ph("wait_q")
            wait_q()
          if config.fused_b2_sum:
            if config.late_loads:  # (b2_s unchanged since "xchg")
              b2v = plgpu.load(b2_s, layout=red0)
            b2_s[...] = b2v + sums[:64]
          for c in range(NL):
            b1c = plgpu.load(b1_s.at[c], layout=red0) if config.late_loads else b1cs[c]
            b1_s[c] = b1c - sums[off + 64 * c:off + 64 * (c + 1)]
        plgpu.commit_smem()

        def bias_sums():  # late_bias_sums: b1_{m+1} from the bf16 G1 the update reads
          for c in range(NL):
            g1 = plgpu.load(g1_s.at[c], layout=plgpu.Layout.WGMMA).astype(f32)
            b1_s[c] = (plgpu.load(b1_s.at[c], layout=red0)
                       - jnp.sum(col(eta_c) * g1, axis=0))
        # ---- (8): W1_c += (-eta K)^T G1_c, W2_c += X2_c^T (-eta G2); W_{m+1} to the queries
        ph("update")
        w1, w2 = update_state(w1, w2, during=bias_sums if config.late_bias_sums else None)
        ph("store_w")
        if not config.pipelined_store:  # (pipelined_store: stored by update_state)
          for c in range(NL):  # (chunk by chunk, W1's then W2's, as before store_state)
            store_state(c, w1[c])
            store_state(NL + c, w2[c])
          w1, w2 = (() if config.w1_smem else w1), (() if config.w2_smem else w2)
        plgpu.commit_smem()
        plgpu.barrier_arrive(sync.at[0])
        ph.close()
        return w1, w2

      for j in range(2 * NL):  # (the carried state starts as hi + lo: its lo2 is zero)
        if in_smem(j):
          lo2_tile(j)[...] = jnp.zeros((64, 64), bf16)
      w1_0, w2_0 = (() if config.w1_smem else w1_0), (() if config.w2_smem else w2_0)
      lax.fori_loop(0, NC, step, (w1_0, w2_0))
      plgpu.barrier_wait(sync.at[1])  # the last mini-batch's (every phase observed)

    # ------------------------------------------------------------------ queries' warpgroup
    def queries():
      plgpu.copy_gmem_to_smem(q_ref.at[bh, 0], q_sb.at[0], qbars.at[0])
      if config.queries_ek:  # every phase of the K / eta barriers it waits on: mini-batch 0's too
        plgpu.barrier_wait(kbars.at[0])
        plgpu.barrier_wait(kbars.at[2])

      def step(j, _):
        """Mini-batch j's output with the state W_{j+1} (after the keys' update j)."""
        slot = j % 2
        q_s = q_sb.at[0 if config.lean_buffers else slot]
        ph = Phases()
        ph("q_load")
        plgpu.barrier_wait(qbars.at[0 if config.lean_buffers else slot])

        if not config.lean_buffers:
          @pl.when(j + 1 < NC)  # the other buffer's output TMA (mini-batch j-1) was waited for
          def _():
            plgpu.copy_gmem_to_smem(q_ref.at[bh, j + 1], q_sb.at[1 - slot], qbars.at[1 - slot])

        ph("q_wait_w")
        plgpu.barrier_wait(sync.at[0])
        if config.queries_ek:  # -eta K of mini-batch j + 1 (buffer 1 - slot, loaded in step j - 1)
          @pl.when(j + 1 < NC)
          def _():
            plgpu.barrier_wait(kbars.at[3 * (1 - slot)])  # its K, and its eta
            plgpu.barrier_wait(kbars.at[3 * (1 - slot) + 2])
            eta_n = plgpu.load(eta_sb.at[1 - slot], layout=red1)
            ek_s[...] = (-col(eta_n) * k_sb[1 - slot].astype(f32)).astype(bf16)
            plgpu.commit_smem()  # (for the keys' wgmma; they wait sync[1], arrived below)
        if config.prefetch_keys:  # the keys are done with buffer j % 2 (step j): m = j + 2 into it
          @pl.when(j + 2 < NC)
          def _():
            load_keys(j + 2, slot)
        ph("q_z1")
        b1r = [row(plgpu.load(b1_s.at[c], layout=red0)) for c in range(NL)]
        b2v = plgpu.load(b2_s, layout=red0)
        zq = mm_multi([(q_s, w1h.at[c]) for c in range(NL)])
        if config.fused_bias_sums:  # X2 in registers, wgmma's lhs (interpret mode: jnp, no rule)
          xq = [_gelu(zq[c] + b1r[c]).astype(bf16) for c in range(NL)]
          ph("q_z2")
          if interpret is not None:
            pq = sum(exact_dot(xq[c], w2h[c]) for c in range(NL))
          else:
            pq = wgmma_chain([(xq[c], w2h.at[c]) for c in range(NL)], shp)
        else:
          for c in range(NL):
            x_s[c] = _gelu(zq[c] + b1r[c]).astype(bf16)
          plgpu.commit_smem()
          ph("q_z2")
          pq = wgmma_chain([(x_s.at[c], w2h.at[c]) for c in range(NL)], shp)
        plgpu.barrier_arrive(sync.at[1])  # W_{j+1}, b1, b2 read: the keys may overwrite them
        ph("q_xchg")
        z2b = exchange(pq, 1, j == 0) + row(b2v)
        ph("q_out")
        xhb, _ = _ln_stats(z2b, ln_eps)
        gam = plgpu.load(gam_s, layout=red0)
        bet = plgpu.load(bet_s, layout=red0)
        out = q_s[...].astype(f32) + row(gam) * xhb + row(bet)

        def write_out():
          q_s[...] = out.astype(bf16)  # q_s doubles as the output tile
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(q_s, o_ref.at[bh, j])
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        on_rank0(write_out)
        if config.lean_buffers:  # Q(j) read, the output stored: Q(j + 1) into the one tile
          plgpu.commit_smem()

          @pl.when(j + 1 < NC)
          def _():
            plgpu.copy_gmem_to_smem(q_ref.at[bh, j + 1], q_sb.at[0], qbars.at[0])
        ph.close()
        return ()

      lax.fori_loop(0, NC, step, ())

    pl.when(w == KEYS)(keys)
    pl.when(w == QUERIES)(queries)
    plgpu.wait_smem_to_gmem(0)
    plgpu.barrier_arrive(both.at[0])  # both warpgroups done: every incoming push was pulled
    plgpu.barrier_wait(both.at[0])
    if C > 1:
      @pl.when(w == KEYS)
      def _():  # no CTA exits while its peer may still push into it
        plgpu.barrier_arrive(cbar.at[0])
        plgpu.barrier_wait(cbar.at[0])

  st = lambda *s: jax.ShapeDtypeStruct(s, bf16)
  sf = lambda *s: jax.ShapeDtypeStruct(s, f32)
  out_type = (st(BH, NC, CS, F),) + ((st(BH, NG, NH, 64, 64), st(BH, NG, NH, 64, 64),
                                       sf(BH, NG, NH, 64), st(BH, NG, NH, 64, 64),
                                       st(BH, NG, NH, 64, 64), sf(BH, NG, 64))
                                      if config.checkpoints else ())
  NK = 2 if config.prefetch_keys else 1  # K/V/eta buffers
  NQ = 1 if config.lean_buffers else 2  # Q buffers (also the output tile)
  scratch = [tile(NQ), tile(NK), tile(1 if config.lean_buffers else NK),  # Q, K, V
             plgpu.SMEM((NK, 64), f32),  # eta
             tile(), tile(), tile(),  # -eta K, G2, -eta G2
             tile(NL), tile(NL),  # G1, keys' X2
             # the queries' X2 (fused_bias_sums: in registers; its bytes go to reduction scratch)
             plgpu.SMEM((8,), f32) if config.fused_bias_sums else tile(NL),
             tile(NL), tile(NL),  # W1, W2
             tile(2 * NL),  # the state's lo halves (init and checkpoints)
             plgpu.SMEM((NL, 64), f32), plgpu.SMEM((64,), f32),  # b1 chunks, b2
             plgpu.SMEM((64,), f32), plgpu.SMEM((64,), f32),  # gamma, beta
             plgpu.Barrier(num_barriers=8), plgpu.Barrier(num_barriers=2),  # keys', queries' TMA
             plgpu.Barrier(num_barriers=2),  # sync[0]: W_{m+1} stored; sync[1]: queries read it
             plgpu.Barrier(num_arrivals=2, num_barriers=1)]  # both warpgroups at the end
  if config.prefetch_keys:
    scratch.append(plgpu.Barrier(num_barriers=6))
  if config.f32_state and C == 1:  # staging (cluster 2: the exchange's receive tiles)
    scratch.append(plgpu.SMEM((2, 64, 64), f32, transforms=F32_TILE_TRANSFORMS))
  x2l_tiles = tile(NL - 2) if config.x2_lo_smem and NL > 2 else None  # (kept last: see body)
  kwargs = dict(num_threads=2, thread_name="wg")
  if C > 1:
    scratch += [f32_tile(), f32_tile(),
                plgpu.Barrier(num_arrivals=C - 1, num_barriers=1),
                plgpu.Barrier(num_arrivals=C - 1, num_barriers=1),
                # [0]: cluster meets; [1 + slot]: the peer has read exchange slot `slot`
                plgpu.ClusterBarrier(collective_axes=("c",), num_barriers=3)]
    kwargs.update(cluster=(C,), cluster_names=("c",))
  if x2l_tiles is not None:
    scratch.append(x2l_tiles)
  if config.w2_smem:  # (kept last, then w1_smem's: see body)
    scratch.append(tile(NL))
  if config.w1_smem:
    scratch.append(tile(NL))
  return per_head_kernel(body, out_type=out_type, scratch=scratch, BH=BH,
                         approx_math=config.approx_math, interpret=interpret, profile=profile,
                         reduction_scratch=config.scratch_bytes, **kwargs)


def main(argv=None) -> dict[str, float]:
  """Times v7* (the GPU default: v7pefsgrbci) against the float32 XLA scan (`kernel_bench.forward_main`):
  `python -m pallas_kernels.ttt_mlp.kernel_ws_mgpu [--nc N] [--variants V,...] [--interpret]`."""
  from pallas_kernels import kernel_bench
  from pallas_kernels.ttt_mlp.ttt_mlp import VARIANTS  # (here: ttt_mlp imports this module)
  variants = tuple(v for v in VARIANTS if v.startswith("v7"))
  return kernel_bench.forward_main(argv, main.__doc__, variants, ("v7pefsgrbci",), layer="mlp")


if __name__ == "__main__":
  main()
