"""`ttt_mlp_pallas`: the Mosaic GPU forward kernel wrapped in a `jax.custom_vjp`.

Forward: `kernel_ws_mgpu.build_forward_ws` (variant "v7pefsgrbci", the default compiled: two
warpgroups per CTA by role, the keys' products and G2 W2^T as (hi, lo) pairs, the float32 state
split in the kernel), `kernel_acc_mgpu.build_forward_acc` ("v4", the interpret-mode default: float32
state in wgmma accumulators, hidden dim over a 2-CTA cluster, mini-batch m-1's queries folded into
step m; "v3" without that folding; cluster 1 in interpret mode) or `kernel_mgpu.build_forward`
("v1"/"v2": state as bf16 (hi, lo) pairs in SMEM); checkpoints every G mini-batches.
Backward (`backward=`, default "pallas_qpass"): checkpoint groups in launches of S (last to first):
the forward kernel restarted from the groups' checkpoints with a checkpoint every mini-batch (and
the keys' forward activations X2 / Z2), the queries' reverse for all those steps at once
(`kernel_qrev_mgpu`, one CTA per step: the output path feeds nothing later in the scan), then the
backward kernel `kernel_bwd_mgpu` reverses the steps, adding the queries' part of the state
cotangent from the loaded tiles; the state cotangent is carried from launch to launch.
"pallas_saved" does the queries' reverse inside the backward kernel (the restart also saves the
queries' X2 / Z2); "pallas" recomputes those activations in the backward kernel; "xla_vjp" restarts the XLA dual-form
scan (`ttt_dit.ttt.inner_loop`) and differentiates it with `jax.vjp`; "reference" runs the
hand-derived recompute-then-reverse of `backward_reference.group_vjp` in XLA.
Unsupported shapes/platforms fall back to the XLA scan with one log line.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import logging

from pallas_kernels import checkpoint_vjp, mgpu_common, platform
from pallas_kernels.ttt_mlp import (backward_reference, kernel_acc_mgpu, kernel_bwd_mgpu,
                                    kernel_mgpu, kernel_qrev_mgpu, kernel_wg2_mgpu, kernel_ws_mgpu,
                                    query_reverse)
from ttt_dit.ttt import inner_loop

Array = jax.Array


def kernel_supported(XQ: Array, W1: Array, *, interpret: bool = False) -> str | None:
  """None if the kernel handles these shapes on this backend, else the reason it does not."""
  B, H, NC, CS, F = XQ.shape
  if (CS, F, W1.shape[-1]) != (kernel_mgpu.CS, kernel_mgpu.F, 4 * kernel_mgpu.F):
    return f"shape CS={CS}, F={F}, hidden={W1.shape[-1]} (kernel: 64, 64, 256)"
  return None if interpret else platform.not_hopper_reason()


def _to_kernel_state(W1, b1, W2, b2, B):
  """[H, ...] float state -> kernel layout, tiled over B: (w1h, w1l, b1, w2h, w2l, b2), [BH, ...]."""
  H, F, Fh = W1.shape
  nh = Fh // 64
  w1 = W1.astype(jnp.float32).reshape(H, F, nh, 64).transpose(0, 2, 1, 3)  # [H, 4, F, 64]
  w2 = W2.astype(jnp.float32).reshape(H, nh, 64, F)  # [H, 4, 64, F]
  split = mgpu_common.split_bf16  # (not via astype round trips: XLA's GPU compiler removes those)
  w1h, w1l = split(w1)
  w2h, w2l = split(w2)
  b1k = b1.astype(jnp.float32).reshape(H, nh, 64)
  b2k = b2.astype(jnp.float32).reshape(H, F)
  tile = lambda a: jnp.broadcast_to(a[None], (B,) + a.shape).reshape((B * H,) + a.shape[1:])
  return tuple(tile(a) for a in (w1h, w1l, b1k, w2h, w2l, b2k))


def _from_kernel_ckpts(ck, B, H):
  """Kernel checkpoints [BH, NG, ...] -> float32 state [NG, B, H, ...] in the scan's layout."""
  w1h, w1l, b1, w2h, w2l, b2 = ck
  BH, NG, nh = w1h.shape[:3]
  f32 = lambda h, l: h.astype(jnp.float32) + l.astype(jnp.float32)
  w1 = f32(w1h, w1l).transpose(0, 1, 3, 2, 4).reshape(B, H, NG, 64, nh * 64)  # [B,H,NG,F,4F]
  w2 = f32(w2h, w2l).reshape(B, H, NG, nh * 64, 64)
  b1 = b1.reshape(B, H, NG, 1, nh * 64)
  b2 = b2.reshape(B, H, NG, 1, 64)
  return tuple(jnp.moveaxis(a, 2, 0) for a in (w1, b1, w2, b2))


# v1/v2: state as bf16 (hi, lo) in SMEM (v1 waits every wgmma). v3: float32 state in wgmma
# accumulators, 2-CTA cluster. v3_precise: v3 with (hi, lo) update operands. v3_exact: v3 without
# approximate math. v3_3pass: v3 with every state-trajectory matmul as 3-pass bf16 (hi, lo)
# products (float32-accurate trajectory; its restarts too). v4 (default): v3 with mini-batch m-1's
# query half inside step m (shared waits and exchange point). v5: v4 with gelu'(Z1) kept from the
# forward half (no Z1 recompute in the gradient phase; AccTuningConfig.early_gelu_grad; H100:
# slower). v4p: v4 with step m+1's inputs loaded during step m (AccTuningConfig.prefetch_next;
# H100: 32% slower, more register spills). v6: v4 with the CTA's hidden chunks split over two
# consumer warpgroups (kernel_wg2_mgpu; b1 as a row-replicated accumulator; H100: 40% slower).
# v4l: v4 with b1's column sums under the update's wgmmas (AccTuningConfig.late_bias_sums).
# v7: v4's step split by role over two warpgroups (kernel_ws_mgpu: keys' trajectory | outputs);
# v7p: with the keys' K/V/eta prefetched by the queries' warpgroup; v7e: with gelu' kept from
# the keys' forward half (WsTuningConfig.early_gelu_grad); v7pe: both; v7pel: v7pe with b1's
# column sums under the update's wgmmas (late_bias_sums); v7pef: v7pe with the updates'
# products in fresh accumulators, added in float32 (WsTuningConfig.fresh_update; H200 NC=282
# 4.03-4.07 ms vs v7pe's 4.44-4.79, interleaved); v3_3passf: v3_3pass the same; v7pefs:
# v7pef with the keys' K W1 and X2 W2 as (hi, lo) pairs (WsTuningConfig.split_products; H200
# NC=282 4.61 ms, gradients 4.8e-3 vs v7pef's 4.08 ms, 2.5e-2); v7pefsg: v7pefs with
# G2 W2^T as (hi, lo) products too (WsTuningConfig.split_g1; H200 +8-9% forward over v7pefs, eta
# ~1e-6 NC=2750 gradients 9.9e-3 / 9.1e-3 where v7pefs gives 3.9e-2 / 3.0e-2); v7pefsr / v7pefsgr
# (default): v7pefs / v7pefsg with K re-read from SMEM and G2's lo half through K's tile
# (WsTuningConfig.reload_keys; bitwise the same; H200 NC=282 v7pefsgr 5-6% faster than v7pefsg);
# v7pefsgrb: b1's column sums of both chunks as one reduction (fused_bias_sums; the queries' X2 in
# registers); v7pefsgrbc: b2's sum in it too (fused_b2_sum; bitwise v7pefsgr, H200 2-3%
# faster at NC 282-5500); v7pefsgrk / v7pefsgrbk: -eta K written by the queries (queries_ek; slower);
# v7pefsgrbci: v7pefsgrbc taking the float32 state as it is, split into (hi, lo) in its prologue
# (WsTuningConfig.f32_state; bitwise v7pefsgrbc; the forward is one launch, no XLA glue);
# after v7pefsgrbci, letters aimed at the keys' spills and latency chain (WsTuningConfig has each):
# x x2_lo_smem, u chunked_update, o pipelined_store, d late_loads, h ek_in_exchange, z
# pipelined_z, w w2_smem, q lean_buffers, y w1_smem, j late_wait_q, t early_target; each bitwise
# v7pefsgrbci in interpret mode, alone and together (v7pefsgrbcidhjtxzuoqwy), none timed yet.
# (H100: benchmarks/NOTES-ttt-mlp.md.)
VARIANTS = ("v1", "v2", "v3", "v3_precise", "v3_exact", "v3_3pass", "v3_3passf", "v4", "v5", "v4p",
            "v6", "v4l", "v7", "v7p", "v7e", "v7pe", "v7pel", "v7pef", "v7pefs", "v7pefsg", "v7pefsr", "v7pefsgr",
            "v7pefsgrb", "v7pefsgrbc", "v7pefsgrk", "v7pefsgrbk", "v7pefsgrbci", "v7pefsgrbcix",
            "v7pefsgrbciu", "v7pefsgrbcixu", "v7pefsgrbciuo", "v7pefsgrbcixuo",
            "v7pefsgrbcid", "v7pefsgrbcidu", "v7pefsgrbciduo", "v7pefsgrbcidxuo",
            "v7pefsgrbcih", "v7pefsgrbcidh", "v7pefsgrbcidhuo", "v7pefsgrbcidhxuo",
            "v7pefsgrbcixz", "v7pefsgrbcidhxz", "v7pefsgrbcidhxzuo", "v7pefsgrbciw",
            "v7pefsgrbciuow", "v7pefsgrbcidhxzuow", "v7pefsgrbciq", "v7pefsgrbciqwy",
            "v7pefsgrbcidhxzuoqwy", "v7pefsgrbcij", "v7pefsgrbcidhjxzuoqwy", "v7pefsgrbcit",
            "v7pefsgrbcidhjtxzuoqwy")


# The forward kernel `ttt_mlp_pallas` runs unless told otherwise (NOTES-ttt-mlp.md: the fastest
# variant whose gradients meet the 2e-2 bound at every draw tested on the H200, NC 282-5500:
# v7pefsg's arithmetic, 4.7e-3 to 9.9e-3, run as v7pefsgrbc (bitwise the same; K and G2's lo half
# through SMEM, b1's and b2's column sums as one cross-warp reduction: H200 NC=1000 15.12-15.36 ms
# vs v7pefsgr's 15.59-15.70 in the same starts, v7pefsg's 16.67); v7pefs is a little faster still but misses at
# NC=2750 eta ~1e-6, 3.9e-2; the bf16-keys v7pef 12% faster but 2.5e-2 at NC=282), taking the
# float32 state as it is (v7pefsgrbci: bitwise v7pefsgrbc on the H100 at NC 282 / 1000, the
# forward one launch with no XLA glue; same start, interleaved: waited 4.57 vs 4.61 ms at NC=282,
# 14.72 vs 14.83 at NC=1000; in flight equal).
DEFAULT_VARIANT = "v7pefsgrbci"
# ... and in Mosaic GPU interpret mode (CPU): jax 0.11.2's interpreter can stall a kernel whose
# warpgroups wait on each other for long stretches (v7*) when the CPU is contended (one warpgroup's
# execution is never scheduled; NOTES-ttt-mlp.md "Interpret mode and two warpgroups"), so the
# CPU default is v4, the same arithmetic as v7 / v7p (bitwise, tested; v7pefs / v7pefsg round
# less: their own emulation test); the v7 kernels' own CPU tests run in subprocesses with a time limit
# (tests/pallas_kernels/test_ttt_mlp_ws_kernel.py).
DEFAULT_INTERPRET_VARIANT = "v4"


def default_variant(interpret: bool) -> str:
  """The variant `ttt_mlp_pallas(variant=None)` runs."""
  return DEFAULT_INTERPRET_VARIANT if interpret else DEFAULT_VARIANT

# SMEM bytes for the kernels' column-sum reductions (`mgpu_common.DEFAULT_REDUCTION_SCRATCH`).
REDUCTION_SCRATCH = kernel_acc_mgpu.DEFAULT_REDUCTION_SCRATCH


def _build(BH, NC, group, ln_eps, interpret, variant, outputs=True, save_activations=False,
           checkpoint_lo=True, save_ln=False, final_checkpoint=False, parts=False,
           reduction_scratch=None, checkpoints=True):
  """The forward kernel of `variant` (same argument/result layout for all of them).

  save_activations (v3 only): 4 more results, the per-step forward activations the backward
  kernel's `saved_forward` takes (kernel_acc_mgpu.AccTuningConfig.save_activations); with
  outputs=False the keys' only (2), or with save_ln their X2 and LayerNorm-L2 parts (5).

  outputs=False (v3/v4/v5 only; the backward's restarts): the states alone, by v3 without its query
  half (the output array is then left unwritten). checkpoint_lo=False (v3/v4/v5 only; the
  restarts): checkpoints without their lo halves (left unwritten; the backward kernel reads hi).
  final_checkpoint (v3 paths only; the restarts): one more checkpoint, the state after the last
  mini-batch. parts (v3 paths only): the kernel's `KernelParts`, not the kernel.
  reduction_scratch (v7 only): SMEM bytes per part of a cross-warp reduction (None:
  REDUCTION_SCRATCH; the fused sums take one such part per [64, 64] operand:
  `WsTuningConfig.scratch_bytes`).
  checkpoints=False (v7 only): the kernel returns (out,) alone and writes no checkpoints.
  """
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
  if reduction_scratch is not None and not variant.startswith("v7"):
    raise ValueError(f"reduction_scratch is a v7 option; variant {variant!r} has none")
  if not checkpoints and not (variant.startswith("v7") and outputs and not save_activations):
    raise ValueError(f"checkpoints=False is a v7 forward option, not {variant!r}'s")
  iparams = jax.experimental.pallas.mosaic_gpu.InterpretGPUParams() if interpret else None
  if variant == "v6" and outputs and not save_activations:  # (restarts: v3, as for v4)
    cfg6 = kernel_wg2_mgpu.Wg2TuningConfig(cluster=1 if interpret else 2,
                                           reduction_scratch=REDUCTION_SCRATCH)
    return kernel_wg2_mgpu.build_forward_wg2(BH, NC, group, ln_eps, config=cfg6,
                                             interpret=iparams)
  if variant.startswith("v7") and outputs and not save_activations:  # (restarts: v3, as for v4)
    cfg7 = kernel_ws_mgpu.WsTuningConfig.from_variant(
        variant, cluster=1 if interpret else 2,
        reduction_scratch=REDUCTION_SCRATCH if reduction_scratch is None else reduction_scratch,
        checkpoints=checkpoints)
    return kernel_ws_mgpu.build_forward_ws(BH, NC, group, ln_eps, config=cfg7, interpret=iparams)
  if variant == "v6" or variant.startswith("v7"):
    variant = "v3"
  if variant.startswith(("v3", "v4", "v5")):  # the exchange has no interpret rule: cluster 1 there
    pipeline = variant in ("v4", "v5", "v4p", "v4l") and outputs
    cfg = kernel_acc_mgpu.AccTuningConfig(cluster=1 if interpret else 2,
                                          precise_update=variant == "v3_precise",
                                          approx_math=variant != "v3_exact",
                                          pipeline=pipeline, outputs=outputs,
                                          three_pass=variant.startswith("v3_3pass"),
                                          fresh_update=variant == "v3_3passf",
                                          save_activations=save_activations,
                                          # (v3_3pass: its SMEM leaves room for 4 KiB at most)
                                          reduction_scratch=REDUCTION_SCRATCH
                                          if not variant.startswith("v3_3pass") else
                                          min(REDUCTION_SCRATCH, 4096),
                                          early_gelu_grad=variant == "v5" and pipeline,
                                          prefetch_next=variant == "v4p" and pipeline,
                                          late_bias_sums=variant == "v4l" and pipeline,
                                          checkpoint_lo=checkpoint_lo, save_ln=save_ln,
                                          final_checkpoint=final_checkpoint)
    return kernel_acc_mgpu.build_forward_acc(BH, NC, group, ln_eps, config=cfg,
                                             interpret=iparams, parts=parts)
  if final_checkpoint or parts:
    raise ValueError(f"final_checkpoint / parts are built only by the v3 kernels, not {variant!r}")
  return kernel_mgpu.build_forward(BH, NC, group, ln_eps, interpret=iparams,
                                   batched=variant == "v2")


def takes_f32_state(variant: str) -> bool:
  """Whether `variant`'s forward kernel takes the float32 state per head as it is (v7 + "i":
  `WsTuningConfig.f32_state`) rather than bf16 (hi, lo) chunks per row (`_to_kernel_state`)."""
  return variant.startswith("v7") and "i" in variant[2:]


def kernel_args(XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, W2, b2, variant: str) -> tuple:
  """The forward kernel's arguments for `variant` ([B, H, ...] inputs -> [BH, ...] rows). With a
  float32 state (`takes_f32_state`) and bf16 / float32 inputs every op here is a bitcast: the
  forward is the kernel's launch alone."""
  B, H, NC, CS, F = XQ.shape
  bf = lambda a: a.astype(jnp.bfloat16).reshape(B * H, NC, CS, F)
  seq = (bf(XQ), bf(XK), bf(XV), eta.astype(jnp.float32).reshape(B * H, NC, CS))
  if takes_f32_state(variant):
    f32 = lambda a: a.astype(jnp.float32)
    nh = W1.shape[-1] // 64
    return seq + (f32(ln_weight), f32(ln_bias), f32(W1), f32(b1).reshape(H, nh, 64),
                  f32(W2).reshape(H, nh, 64, F), f32(b2).reshape(H, F))
  return seq + (_per_head(ln_weight, B), _per_head(ln_bias, B),
                *_to_kernel_state(W1, b1, W2, b2, B))


def _forward_raw(XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, W2, b2, *, group, ln_eps,
                 interpret, variant=None, reduction_scratch=None, checkpoints=True):
  """Runs the kernel: ([B, H, NC, CS, F] out in XQ's dtype, kernel-layout checkpoints [BH, NG, ...])
  (reduction_scratch: `_build`'s, for the v7 variants' benchmarks; checkpoints=False: the v7
  kernels write none and return (), the others return theirs)."""
  B, H, NC, CS, F = XQ.shape
  variant = default_variant(interpret) if variant is None else variant
  fn = _build(B * H, NC, group, float(ln_eps), interpret, variant,
              reduction_scratch=reduction_scratch,
              checkpoints=checkpoints or not variant.startswith("v7"))
  res = fn(*kernel_args(XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, W2, b2, variant))
  return res[0].reshape(B, H, NC, CS, F).astype(XQ.dtype), tuple(res[1:])


def _per_head(a, B):
  """[H, F] -> [B * H, F] float32."""
  H, F = a.shape
  return jnp.broadcast_to(a.astype(jnp.float32)[None], (B, H, F)).reshape(B * H, F)


def _forward(XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, W2, b2, *, group, ln_eps, interpret,
             variant=None):
  """Runs the kernel: ([B, H, NC, CS, F] out in XQ's dtype, checkpoint states [NG, B, H, ...])."""
  out, ck = _forward_raw(XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, W2, b2, group=group,
                         ln_eps=ln_eps, interpret=interpret, variant=variant)
  return out, _from_kernel_ckpts(ck, XQ.shape[0], XQ.shape[1])


# jax.vjp of the dual-form scan | hand-derived primal steps (XLA) | the Mosaic GPU backward kernel
# | the same kernel with BwdTuningConfig(dw_gmem=True) (opt-in variant: dW kept in GMEM, not regs)
# | the kernel fed the restart's saved forward activations (no recompute; H100, same start, whole
# backward 40.0 -> 36.3 ms at NC=282 and 134.0 -> 123.6 ms at NC=1000, bitwise equal)
# | the default: the same, with the queries' reverse for all steps at once outside the backward
# kernel (`kernel_qrev_mgpu`; H100, same start, NC=282 37.0 -> 33.4 ms, gradients within 2.1e-3)
BACKWARDS = ("xla_vjp", "reference", "pallas", "pallas_dw_gmem", "pallas_saved", "pallas_qpass")
_KERNEL_BACKWARDS = {"pallas": {}, "pallas_dw_gmem": {"dw_gmem": True},
                     "pallas_saved": {"saved_forward": True},
                     "pallas_qpass": {"saved_forward": True, "query_pass": True}}


# Whether a forward that nothing differentiates (the custom_vjp's primal call) has the v7 kernel
# write its checkpoints anyway. H100, same start, interleaved (NOTES-ttt-mlp.md): without them
# the kernel is bitwise the same but NOT faster: in flight 4.15 vs 4.11 ms at NC=282, 14.41 vs
# 14.17 at NC=1000 (+1.7%, every round). False saves their memory (2.1 GiB per call at NC=5500,
# H=48), so inference may want it.
PRIMAL_CHECKPOINTS = True


@functools.partial(jax.custom_vjp, nondiff_argnums=(10, 11, 12, 13, 14))
def _ttt_mlp_kernel(XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, W2, b2, group, ln_eps, interpret,
                    variant, backward):
  return _forward_raw(XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, W2, b2, group=group,
                      ln_eps=ln_eps, interpret=interpret, variant=variant,
                      checkpoints=PRIMAL_CHECKPOINTS)[0]


def _fwd(XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, W2, b2, group, ln_eps, interpret, variant,
         backward):
  if backward in _KERNEL_BACKWARDS:  # the backward kernel restarts the forward kernel: keep its layout
    out, ckpts = _forward_raw(XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, W2, b2, group=group,
                              ln_eps=ln_eps, interpret=interpret, variant=variant)
    return out, (XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, W2, b2, ckpts)
  out, ckpts = _forward(XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, W2, b2, group=group,
                        ln_eps=ln_eps, interpret=interpret, variant=variant)
  return out, (XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, W2, b2, ckpts)


def _bwd(group, ln_eps, interpret, variant, backward, res, dout):
  """Reverse over checkpoint groups, restarting from each kernel checkpoint.

  backward="xla_vjp": `jax.vjp` of the XLA dual-form group scan; "reference": the hand-derived
  recompute-then-reverse of `backward_reference.group_vjp` (what a backward kernel will run).
  """
  if backward in _KERNEL_BACKWARDS:
    return _bwd_pallas(group, ln_eps, interpret, variant, res, dout,
                       **_KERNEL_BACKWARDS[backward])
  del interpret, variant
  *inputs, ckpts = res
  return checkpoint_vjp.vjp_from_checkpoints(
      inner_loop._mlp_step, ckpts, tuple(inputs), dout, group=group, ln_eps=ln_eps,  # noqa: SLF001
      input_dtype=jnp.float32,
      group_vjp=backward_reference.group_vjp if backward == "reference" else None)


# The backward's restarts keep their query half. Without it (outputs=False) the restart kernel
# alone is 5-20% faster and the NC=282 backward 8% faster, but the NC=1000 backward 9% slower
# (H100, same run; NOTES-ttt-mlp.md). `benchmarks.ttt_mlp_bwd_ablate restart_outputs` flips this.
RESTART_OUTPUTS = True

# backward="pallas_qpass": the queries' reverse by the Mosaic GPU kernel (`kernel_qrev_mgpu`, one
# CTA per step) or by XLA (`query_reverse`, its reference: H100 NC=282 ~8 ms of small fusions).
QUERY_PASS = "kernel"


# Bytes of per-step restart states one backward launch may hold: the forward kernel is restarted
# for several checkpoint groups at once (one launch, the groups side by side as extra "heads"),
# then one backward-kernel launch walks all their steps. ~275 KiB per step and head allocated with
# pallas_qpass (states hi, lo, biases; the keys' activations; the queries' reverse): 4 GiB = 18
# groups of 16 at H=48. H100, one start, pallas_qpass NC=282 whole backward 33.3 ms (one group per
# launch) vs 29.1 ms (all 18 in one launch: the restarts run in fewer waves). 0: one group per
# launch, the least memory.
BWD_LAUNCH_BYTES = 4 << 30
# pallas_qpass: the backward kernel waits for each of a step's loads just before its first use
# (`BwdTuningConfig.lazy_waits`) instead of all at the step's start. H100, same start, NC=282:
# whole backward 24.3-24.5 vs 24.8-24.9 ms (-1.8%), gradients bitwise equal.
BWD_LAZY_WAITS = True
# The backward kernel's column sums fused (`BwdTuningConfig.fused_sums`: 0 none, 1 the LayerNorm-L2
# VJP's dgamma / dbeta / db2 as one reduction, 2 also db1's chunks as one). H100, same start,
# NC=282: bitwise the same gradients, whole backward 3-5% slower (level 1 24.1-24.2, level 2 24.0
# vs 23.1-23.4 ms; more spills, NOTES-ttt-mlp.md). Opt-in.
BWD_FUSED_SUMS = 0
# True: launch s's backward kernel and launch s - 1's restarts run as one launch
# (`mgpu_common.two_role_kernel`): the backward kernel's 2 BH = 96 CTAs hold their SMs for the
# whole launch, the restarts take RESTART_PROGRAMS clusters of the 36 SMs left on an H100 (launches
# in pairs, sized with half of BWD_LAUNCH_BYTES: two launches' states live). H100, same start:
# no faster (NC=1000 whole backward 87.1 vs 87.0 ms): the restarts hide, but the backward's steps
# get ~9% slower next to their memory traffic (NOTES-ttt-mlp.md). Opt-in.
FUSED_RESTARTS = False
RESTART_PROGRAMS = 16
# What one more launch costs, in checkpoint groups of backward work (H100, NC=282: 17 launches
# fewer saved 4.3 ms, ~0.12 of a group's ~2 ms): launches are sized to minimise padded groups
# plus this per launch.
BWD_LAUNCH_COST_GROUPS = 0.12
_RESTART_STEP_BYTES = 2 * 2 * (4 * 64 * 64 * 2) + 64 * 64 * 2 + 4 * 64 * 4 + 64 * 4
_SAVED_STEP_BYTES = 2 * (4 * 64 * 64 * 2) + 2 * 64 * 64 * 4  # + X2 chunks and Z2 of keys, queries
# + the keys' X2 chunks, G2, xhat, h, rstd; the queries' reverse: X2b, dZ1b chunks, dZ2b, dQ
# (f32), 4 vectors
_QPASS_STEP_BYTES = (4 * 64 * 64 * 2 + 3 * 64 * 64 * 2 + 64 * 4) + (
    2 * 4 * 64 * 64 * 2 + 64 * 64 * 2 + 64 * 64 * 4 + 7 * 64 * 4)


def groups_per_launch(NG: int, BH: int, G: int, budget: int = None,
                      step_bytes: int = _RESTART_STEP_BYTES, even: bool = False
                      ) -> tuple[int, int]:
  """(groups per backward launch S, launches L): S * L >= NG groups, S within the byte budget,
  chosen to minimise the groups walked (padding included) + BWD_LAUNCH_COST_GROUPS per launch;
  even: L even (launches in pairs)."""
  budget = BWD_LAUNCH_BYTES if budget is None else budget
  s_max = max(1, min(NG, budget // (BH * (G + 1) * step_bytes)))
  launches = lambda S: -(-NG // S) + (-(-NG // S) % 2 if even else 0)
  cost = lambda S: (launches(S) * (S + BWD_LAUNCH_COST_GROUPS), -S)
  S = min(range(1, s_max + 1), key=cost)
  return S, launches(S)


def _bwd_pallas(group, ln_eps, interpret, variant, res, dout, **tuning):
  """backward="pallas": checkpoint groups in launches of S (`groups_per_launch`), last to first.
  Per launch (1) the forward kernel restarted from the S groups' checkpoints at once (S G steps
  as BH S rows of G), with a checkpoint every mini-batch and after the last (the per-step states),
  (2) the backward kernel (`kernel_bwd_mgpu`) over the S G steps in reverse, carrying the state
  cotangent from launch to launch. Inputs are padded to NGP G mini-batches (eta = 0: no-op steps,
  zero cotangents), padded groups restart from the last checkpoint, so every launch has the same
  shapes; a launch's slice of an input serves both kernels (the restart's rows are a reshape).
  """
  XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, W2, b2, ck = res
  B, H, NC, CS, F = XQ.shape
  BH, G = B * H, group
  NG = ck[0].shape[1]
  saved = tuning.get("saved_forward", False)
  qpass = tuning.get("query_pass", False)
  fused = FUSED_RESTARTS
  S, L = groups_per_launch(NG, BH, G, step_bytes=_RESTART_STEP_BYTES + (
      _QPASS_STEP_BYTES if qpass else _SAVED_STEP_BYTES if saved else 0),
      budget=BWD_LAUNCH_BYTES // 2 if fused else None, even=fused)  # (fused: 2 launches live)
  NP = S * L * G
  f32, bf16 = jnp.float32, jnp.bfloat16
  padded = lambda a, dt: jnp.pad(a.astype(dt).reshape((BH, NC) + a.shape[3:]),
                                 [(0, 0), (0, NP - NC)] + [(0, 0)] * (a.ndim - 3))
  q, k, v, do = (padded(a, bf16) for a in (XQ, XK, XV, dout))
  e = padded(eta, f32)
  ck = tuple(jnp.pad(a, [(0, 0), (0, S * L - NG)] + [(0, 0)] * (a.ndim - 2), mode="edge")
             for a in ck)
  gam, bet = _per_head(ln_weight, B), _per_head(ln_bias, B)
  gam_s, bet_s = jnp.repeat(gam, S, axis=0), jnp.repeat(bet, S, axis=0)  # [BH * S, F]
  C = 1 if interpret else 2
  # v4's folding does not pay over a G step restart (H100 NC=1000 fwd+bwd 149 vs 142 ms), and
  # only the v3 kernels write the final checkpoint: v3 (v3_precise / v3_exact / v3_3pass as such)
  restart = variant if variant.startswith("v3") and not saved else "v3"
  restart_outputs = (RESTART_OUTPUTS or saved) and not qpass
  fwd = _build(BH * S, G, 1, float(ln_eps), interpret, restart, outputs=restart_outputs,
               save_activations=saved, checkpoint_lo=False, save_ln=qpass, final_checkpoint=True)
  iparams = jax.experimental.pallas.mosaic_gpu.InterpretGPUParams() if interpret else None
  bwd_cfg = kernel_bwd_mgpu.BwdTuningConfig(cluster=C, reduction_scratch=REDUCTION_SCRATCH,
                                            lazy_waits=BWD_LAZY_WAITS and qpass,
                                            fused_sums=BWD_FUSED_SUMS, **tuning)
  bwd = kernel_bwd_mgpu.build_backward(BH, G, float(ln_eps), groups=S, config=bwd_cfg,
                                       interpret=iparams)
  if fused:  # the backward kernel of launch s with the restarts of launch s - 1 on other SMs
    bwd_parts = kernel_bwd_mgpu.build_backward(BH, G, float(ln_eps), groups=S, config=bwd_cfg,
                                               interpret=iparams, parts=True)
    fused_kernel = mgpu_common.two_role_kernel(
        bwd_parts, 15 + (9 if qpass else 4 if saved else 0), BH,
        _build(BH * S, G, 1, float(ln_eps), interpret, restart, outputs=restart_outputs,
               save_activations=saved, checkpoint_lo=False, save_ln=qpass,
               final_checkpoint=True, parts=True),
        12, BH * S, RESTART_PROGRAMS, interpret=iparams)

  if qpass and QUERY_PASS not in ("kernel", "xla"):
    raise ValueError(f"QUERY_PASS must be 'kernel' or 'xla', got {QUERY_PASS!r}")
  if qpass and QUERY_PASS == "kernel":
    qrev = kernel_qrev_mgpu.build_query_reverse(
        BH, S, G, float(ln_eps), config=kernel_qrev_mgpu.QrevTuningConfig(
            reduction_scratch=REDUCTION_SCRATCH),  # (dQ in Q's dtype: bf16 written by the kernel)
        dq_dtype=bf16 if XQ.dtype == bf16 else f32,
        interpret=jax.experimental.pallas.mosaic_gpu.InterpretGPUParams() if interpret else None)

  def launch_inputs(s):
    """Launch s's S G steps of q, k, v, eta, dout [BH, S G, ...] and its S checkpoints [BH S, ...]."""
    st0 = tuple(jax.lax.dynamic_slice_in_dim(a, s * S, S, axis=1).reshape((BH * S,) + a.shape[2:])
                for a in ck)
    return tuple(jax.lax.dynamic_slice_in_dim(a, s * S * G, S * G, axis=1)
                 for a in (q, k, v, e, do)), st0

  def restart_args(s):
    """The restart kernel's arguments for launch s (its rows [BH S, G, ...]: a reshape)."""
    (qs, ks, vs, es, _), st0 = launch_inputs(s)
    win = lambda a: a.reshape((BH * S, G) + a.shape[2:])
    kw = win(ks)  # (without its query half the restart never reads Q: K's rows stand in)
    return (win(qs) if restart_outputs else kw, kw, win(vs), win(es), gam_s, bet_s) + st0

  def prepared(s, restarted):
    """Launch s's backward kernel inputs that nothing in the scan's carry feeds, from its
    restart's results: the per-step states, the keys' activations, and (qpass) the queries'
    reverse."""
    _, sw1, _, sb1, sw2, _, sb2, *acts = restarted
    if not qpass:
      return (sw1, sb1, sw2, sb2), tuple(acts), ()
    (qs, _, _, _, dos), _ = launch_inputs(s)
    if QUERY_PASS == "kernel":  # the output path's reverse of the S G steps, from the states after
      qr = qrev(qs, dos, sw1, sb1, sw2, sb2, gam)
    else:
      after = lambda a: a[:, 1:].reshape((BH, S * G) + a.shape[2:])  # [BH, S G, ...]
      qr = query_reverse.query_reverse(qs, dos, after(sw1), after(sb1), after(sw2),
                                       after(sb2), gam[:, None], bet[:, None], float(ln_eps))
    return (sw1, sb1, sw2, sb2), tuple(acts), tuple(qr)

  def bwd_args(carry, s, prep):
    """The backward kernel's arguments for launch s."""
    dw1, db1, dw2, db2, _, _ = carry
    (sw1, sb1, sw2, sb2), acts, qr = prep
    (qs, ks, vs, es, dos), _ = launch_inputs(s)
    if qpass:
      qr = query_reverse.QueryReverse(*qr)
      return (qs, ks, vs, es, qr.dz2, gam, bet, sw1, sb1, sw2, sb2, dw1, db1, dw2, db2, *acts,
              qr.x2, qr.dz1, qr.db1, qr.db2)  # (acts: kx2, kg2, kxh, kh, krstd)
    return (qs, ks, vs, es, dos, gam, bet, sw1, sb1, sw2, sb2, dw1, db1, dw2, db2,
            *acts)  # (saved_forward: kx2, kz2, qx2, qz2)

  def bwd_results(carry, prep, res):
    """(carry, (dq, dk, dv, deta) of the launch) from the backward kernel's results."""
    if qpass:
      qr = query_reverse.QueryReverse(*prep[2])
      dk, dv, de, dgam_g, dbet_g, dw1, db1, dw2, db2 = res
      dgam_g = dgam_g + jnp.sum(qr.dgamma, axis=1)
      dbet_g = dbet_g + jnp.sum(qr.dbeta, axis=1)
      dq = qr.dq[:, None]  # [BH, 1, S G, 64, 64]: dQ whole (dout included)
    else:
      dq, dk, dv, de, dgam_g, dbet_g, dw1, db1, dw2, db2 = res
    dgam, dbet = carry[4:]
    return (dw1, db1, dw2, db2, dgam + dgam_g, dbet + dbet_g), (dq, dk, dv, de)

  z = lambda *s: jnp.zeros(s, f32)
  init = (z(BH, 4, 64, 64), z(BH, 4, 64), z(BH, 4, 64, 64), z(BH, 64), z(BH, 64), z(BH, 64))

  def body(carry, s):  # launch s: its restarts, then its backward kernel
    prep = prepared(s, fwd(*restart_args(s)))
    return bwd_results(carry, prep, bwd(*bwd_args(carry, s, prep)))

  if not fused and L == 1:  # one launch: no loop, so no stacking copy of its results
    (dw1, db1, dw2, db2, dgam, dbet), outs = body(init, 0)
    dq, dk, dv, de = (a[None] for a in outs)
  elif not fused:
    (dw1, db1, dw2, db2, dgam, dbet), (dq, dk, dv, de) = jax.lax.scan(
        body, init, jnp.arange(L), reverse=True)
  else:  # launches in pairs (s = 2p + 1, then 2p): no launch's inputs cross the loop carry while
    n_bwd_out = len(bwd_parts.out_type)  # they are read (no carry copies)

    def one(carry, s, prep):  # launch s's backward kernel and launch s - 1's restarts (launch 0:
      res = fused_kernel(*bwd_args(carry, s, prep),  # launch 0's again, unused)
                         *restart_args(jnp.maximum(s - 1, 0)))
      carry, outs = bwd_results(carry, prep, res[:n_bwd_out])
      return carry, outs, prepared(jnp.maximum(s - 1, 0), res[n_bwd_out:])

    def body(carry, p):
      carry, prep = carry
      carry, outs_hi, prep = one(carry, 2 * p + 1, prep)
      carry, outs_lo, prep = one(carry, 2 * p, prep)
      return (carry, prep), jax.tree.map(lambda a, b: jnp.stack([a, b]), outs_lo, outs_hi)

    ((dw1, db1, dw2, db2, dgam, dbet), _), outs = jax.lax.scan(
        body, (init, prepared(L - 1, fwd(*restart_args(L - 1)))), jnp.arange(L // 2),
        reverse=True)
    dq, dk, dv, de = (a.reshape((L,) + a.shape[2:]) for a in outs)  # [L/2, 2, ...]: launch 2p + j

  def steps(a):  # [L, BH, S G, ...] -> [B, H, NC, ...] float32
    a = jnp.moveaxis(a.astype(f32), 0, 1).reshape((BH, L * S * G) + a.shape[3:])[:, :NC]
    return a.reshape((B, H, NC) + a.shape[2:])

  dv = steps(dv)
  dq = steps(jnp.sum(dq.astype(f32), axis=2)) + (0.0 if qpass else dout.astype(f32))
  dk = steps(jnp.sum(dk.astype(f32), axis=2)) - dv
  de = steps(jnp.sum(de, axis=2))
  per_h = lambda a: jnp.sum(a.reshape((B, H) + a.shape[1:]), axis=0)
  dW1 = per_h(dw1.transpose(0, 2, 1, 3).reshape(BH, F, 4 * F))
  dW2 = per_h(dw2.reshape(BH, 4 * F, F))
  db1 = per_h(db1.reshape(BH, 1, 4 * F))
  db2 = per_h(db2.reshape(BH, 1, F))
  cast = lambda a, like: a.astype(like.dtype)
  return (cast(dq, XQ), cast(dk, XK), cast(dv, XV), cast(de, eta),
          cast(per_h(dgam), ln_weight), cast(per_h(dbet), ln_bias), cast(dW1, W1), cast(db1, b1),
          cast(dW2, W2), cast(db2, b2))


_ttt_mlp_kernel.defvjp(_fwd, _bwd)


def ttt_mlp_pallas(XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, W2, b2, *,
                   checkpoint_group_size: int = 16, ln_eps: float = 1e-6, interpret: bool = False,
                   variant: str | None = None, backward: str = "pallas_qpass"):
  """TTT-MLP with the fused kernels; same contract as `ttt_dit.ttt.inner_loop.ttt_mlp`.

  Returns [B, H, NC, CS, F] in XQ's dtype. `interpret=True` runs the kernel in Mosaic GPU interpret
  mode (CPU tests); `variant` picks the forward kernel (VARIANTS; None: v7pefsgrbci compiled, v4 in
  interpret mode: `default_variant`);
  `backward` picks the VJP (BACKWARDS; "pallas_qpass", the default: the queries' reverse by its own
  kernel for all steps at once, the backward kernel fed the restart's saved keys' activations;
  rounds an odd checkpoint group up to even; H100 NC=282 whole backward ~23.5 ms vs ~37 ms with
  "pallas_saved", the queries' reverse inside the backward kernel (gradients within ~2e-3), vs
  ~220 ms with "xla_vjp"; "pallas": pallas_saved recomputing those activations,
  8-10% slower, bitwise the same gradients; "pallas_dw_gmem": the
  same kernel with dW in GMEM instead of registers, same gradients, not consistently faster:
  opt-in). Unsupported shapes or devices log one line and use the XLA scan.
  Accuracy: at eta ~1e-5 the bf16 default's gradients are ~2.4e-2 (rel L2, NC=282) from the
  float32 scan's; `variant="v3_3pass", backward="pallas"` (float32-accurate trajectory and
  restarts) gives 1.76e-2 at ~1.6x the forward and ~1.4x the backward time (H200, RESULTS.md).
  """
  if backward not in BACKWARDS:
    raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
  variant = default_variant(interpret) if variant is None else variant
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
  why = kernel_supported(XQ, W1, interpret=interpret)
  if why is not None:
    logging.info("ttt_mlp_pallas: falling back to the XLA scan: %s", why)
    return inner_loop.ttt_mlp(XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, W2, b2,
                              checkpoint_group_size=checkpoint_group_size, ln_eps=ln_eps,
                              implementation="xla")
  group = max(1, min(int(checkpoint_group_size), XQ.shape[2]))
  if backward in _KERNEL_BACKWARDS and group % 2:  # the backward kernel walks steps in pairs; the group
    group += 1  # size only sets where checkpoints are kept (memory), never the results
  return _ttt_mlp_kernel(XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, W2, b2, group,
                         float(ln_eps), bool(interpret), str(variant), str(backward))
