"""`ttt_linear_pallas`: the Mosaic GPU TTT-Linear forward kernel wrapped in a `jax.custom_vjp`.

Forward: `kernel_mgpu.build_forward` (float32 W1 in one wgmma accumulator for the whole scan, one
CTA per (b, h)), checkpoints of (W1, b1) every `checkpoint_group_size` mini-batches.
Backward `backward="xla_vjp"`: for each checkpoint group, last to first, the XLA dual-form scan
(`ttt_linear_scan_reference`, the same math as `ttt_dit.ttt.inner_loop.ttt_linear`) is restarted
from the kernel's checkpoint and differentiated with `jax.vjp`; the state cotangent is carried from
group to group.
Backward `backward="pallas"` (the default): per group, the forward kernel restarted from the
checkpoint with a checkpoint every mini-batch, then the backward kernel `kernel_bwd_mgpu` over the
group in reverse (H100, B=1, H=48: fwd+bwd 8.1 ms at NC=282 vs 58.1 with xla_vjp, 74.6 for the XLA
scan; benchmarks/RESULTS.md).
Unsupported shapes/platforms fall back to the XLA scan with one log line.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import logging

from pallas_kernels import checkpoint_vjp, platform
from pallas_kernels.mgpu_common import DEFAULT_REDUCTION_SCRATCH
from pallas_kernels.ttt_linear import kernel_bwd_mgpu, kernel_mgpu
from ttt_dit.ttt import inner_loop

Array = jax.Array

# forward kernel configurations (H100 timings: benchmarks/NOTES-ttt-linear.md)
VARIANTS = {
    "primal": kernel_mgpu.LinearTuningConfig(),
    "dual": kernel_mgpu.LinearTuningConfig(dual_form=True),
    "primal_prefetch": kernel_mgpu.LinearTuningConfig(prefetch=True),
    "dual_prefetch": kernel_mgpu.LinearTuningConfig(dual_form=True, prefetch=True),
    "primal_prefetch_split": kernel_mgpu.LinearTuningConfig(prefetch=True, split_state=True),
    "dual_prefetch_split": kernel_mgpu.LinearTuningConfig(dual_form=True, prefetch=True,
                                                          split_state=True),
    "primal_prefetch_split_wide": kernel_mgpu.LinearTuningConfig(  # 8 KiB reduction scratch
        prefetch=True, split_state=True, reduction_scratch=4 * DEFAULT_REDUCTION_SCRATCH),
}
# primal_prefetch: fastest at every NC where both ran on the H100 (7-14% over primal), same outputs.
# primal_prefetch_split (default): its trajectory's K W1 with W1 as (hi, lo) (split_state). H200,
# B=1, H=48, eta ~1e-5: gradients 3.0e-3 / 3.5e-3 / 3.5e-3 at NC = 282 / 2750 / 5500 where
# primal_prefetch gives 9.6e-3 / 2.65e-2 / 3.4e-2; forward +10% at NC >= 2750 (8.35 vs 7.58 ms at
# 2750), fwd+bwd +2-3% (NOTES-ttt-linear.md "split_state").
DEFAULT_VARIANT = "primal_prefetch_split"
# jax.vjp of the XLA dual-form scan from the checkpoints | the Mosaic GPU backward kernel
BACKWARDS = ("xla_vjp", "pallas", "pallas_wide")
# the backward kernel's configuration per `backward=` choice ("pallas_wide": 8 KiB of reduction
# scratch, its six column sums per step in one round each; bitwise "pallas")
_BWD_CONFIGS = {"pallas": kernel_bwd_mgpu.BwdTuningConfig(),
                "pallas_wide": kernel_bwd_mgpu.BwdTuningConfig(
                    reduction_scratch=4 * DEFAULT_REDUCTION_SCRATCH)}


def kernel_supported(XQ: Array, *, interpret: bool = False) -> str | None:
  """None if the kernel handles these shapes on this backend, else the reason it does not."""
  B, H, NC, CS, F = XQ.shape
  if (CS, F) != (kernel_mgpu.CS, kernel_mgpu.F):
    return f"shape CS={CS}, F={F} (kernel: 64, 64)"
  return None if interpret else platform.not_hopper_reason()


def ttt_linear_scan_reference(XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, *,
                              checkpoint_group_size: int = 16, ln_eps: float = 1e-6):
  """The pure-jnp reference the kernel is checked against: the XLA dual-form scan.

  XQ, XK, XV [B, H, NC, CS, F]; eta [B, H, NC, CS]; ln_weight, ln_bias [H, F]; W1 [H, F, F];
  b1 [H, 1, F]. Returns (out [B, H, NC, CS, F] in XQ's dtype, (W1, b1) final [B, H, ...]).
  """
  out, final, _ = inner_loop._run_scan(
      inner_loop._linear_step, XQ, XK, XV, eta, ln_weight, ln_bias, (W1, b1),
      checkpoint_group_size=checkpoint_group_size, ln_eps=ln_eps, diagnostics=False)
  return out, final


def _per_head(a, B):
  """[H, F] -> [B * H, F] float32."""
  H, F = a.shape
  return jnp.broadcast_to(a.astype(jnp.float32)[None], (B, H, F)).reshape(B * H, F)


def _forward_raw(XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, *, group, ln_eps, interpret,
                 variant):
  """Runs the kernel: (out [B, H, NC, CS, F] in XQ's dtype, kernel-layout float32 checkpoints
  (W1 [BH, NG, F, F], b1 [BH, NG, F]): the state before mini-batch g * group)."""
  B, H, NC, CS, F = XQ.shape
  BH = B * H
  bf = lambda a: a.astype(jnp.bfloat16).reshape(BH, NC, CS, F)  # [BH, NC, CS, F]
  tile = lambda a: jnp.broadcast_to(a.astype(jnp.float32)[None], (B,) + a.shape).reshape(
      (BH,) + a.shape[1:])
  fn = kernel_mgpu.build_forward(BH, NC, group, float(ln_eps), config=VARIANTS[variant],
                                 interpret=_iparams(interpret))
  out, cw1, cb1 = fn(bf(XQ), bf(XK), bf(XV), eta.astype(jnp.float32).reshape(BH, NC, CS),
                     _per_head(ln_weight, B), _per_head(ln_bias, B), tile(W1),  # [BH, F, F]
                     tile(b1).reshape(BH, F))
  return out.reshape(B, H, NC, CS, F).astype(XQ.dtype), (cw1, cb1)


def _iparams(interpret):
  return jax.experimental.pallas.mosaic_gpu.InterpretGPUParams() if interpret else None


def _forward(XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, *, group, ln_eps, interpret, variant):
  """Runs the kernel: (out [B, H, NC, CS, F] in XQ's dtype, (W1 [NG, B, H, F, F],
  b1 [NG, B, H, 1, F]) float32 checkpoints: the state before mini-batch g * group)."""
  B, H, NC, CS, F = XQ.shape
  out, (cw1, cb1) = _forward_raw(XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, group=group,
                                 ln_eps=ln_eps, interpret=interpret, variant=variant)
  NG = cw1.shape[1]
  ck_w1 = jnp.moveaxis(cw1.reshape(B, H, NG, F, F), 2, 0)  # [NG, B, H, F, F]
  ck_b1 = jnp.moveaxis(cb1.reshape(B, H, NG, 1, F), 2, 0)  # [NG, B, H, 1, F]
  return out, (ck_w1, ck_b1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11, 12))
def _ttt_linear_kernel(XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, group, ln_eps, interpret,
                       variant, backward):
  return _forward(XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, group=group, ln_eps=ln_eps,
                  interpret=interpret, variant=variant)[0]


def _fwd(XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, group, ln_eps, interpret, variant,
         backward):
  if backward in _BWD_CONFIGS:  # the backward kernel restarts the forward kernel: keep its layout
    out, ckpts = _forward_raw(XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, group=group,
                              ln_eps=ln_eps, interpret=interpret, variant=variant)
    return out, (XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, ckpts)
  out, ckpts = _forward(XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, group=group, ln_eps=ln_eps,
                        interpret=interpret, variant=variant)
  return out, (XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, ckpts)


def _bwd(group, ln_eps, interpret, variant, backward, res, dout):
  """Reverse over checkpoint groups: `jax.vjp` of the XLA group scan from each kernel checkpoint
  (backward="xla_vjp"), or the backward kernel (backward="pallas", `_bwd_pallas`)."""
  if backward in _BWD_CONFIGS:
    return _bwd_pallas(group, ln_eps, interpret, variant, res, dout, _BWD_CONFIGS[backward])
  del interpret, variant
  *inputs, ckpts = res
  return checkpoint_vjp.vjp_from_checkpoints(inner_loop._linear_step, ckpts, tuple(inputs), dout,  # noqa: SLF001
                                             group=group, ln_eps=ln_eps)


def _bwd_pallas(group, ln_eps, interpret, variant, res, dout,
                config=kernel_bwd_mgpu.BwdTuningConfig()):
  """backward="pallas": per checkpoint group, last to first, (1) the forward kernel restarted from
  the group's checkpoint with a checkpoint every mini-batch (the per-step states), (2) the backward
  kernel (`kernel_bwd_mgpu`) over the group's steps in reverse, carrying the state cotangent from
  group to group. Inputs are padded to NG * G + 1 mini-batches (eta = 0: no-op steps, zero output
  cotangents), so every group has the same shape and its G + 1-th state.
  """
  XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, (cw1, cb1) = res
  B, H, NC, CS, F = XQ.shape
  BH, G = B * H, group
  NG = cw1.shape[1]
  NP = NG * G + 1
  f32, bf16 = jnp.float32, jnp.bfloat16
  padded = lambda a, dt: jnp.pad(a.astype(dt).reshape((BH, NC) + a.shape[3:]),
                                 [(0, 0), (0, NP - NC)] + [(0, 0)] * (a.ndim - 3))
  q, k, v, do = (padded(a, bf16) for a in (XQ, XK, XV, dout))  # [BH, NP, CS, F]
  e = padded(eta, f32)  # [BH, NP, CS]
  gam, bet = _per_head(ln_weight, B), _per_head(ln_bias, B)  # [BH, F]
  fwd = kernel_mgpu.build_forward(BH, G + 1, 1, float(ln_eps), config=VARIANTS[variant],
                                  interpret=_iparams(interpret))
  bwd = kernel_bwd_mgpu.build_backward(BH, G, float(ln_eps), config=config,
                                       interpret=_iparams(interpret))
  dts = tuple(a.dtype for a in (XQ, XK, XV))

  def body(carry, g):
    dw, db, dgam, dbet = carry  # [BH, F, F], [BH, F] x3
    sl = lambda a, n: jax.lax.dynamic_slice_in_dim(a, g * G, n, axis=1)
    qg, kg, vg, eg = (sl(a, G + 1) for a in (q, k, v, e))
    w0 = jax.lax.dynamic_index_in_dim(cw1, g, axis=1, keepdims=False)
    b0 = jax.lax.dynamic_index_in_dim(cb1, g, axis=1, keepdims=False)
    _, sw, sb = fwd(qg, kg, vg, eg, gam, bet, w0, b0)  # states [BH, G + 1, ...]
    dq, dk, dv, de, dgam_g, dbet_g, dw, db = bwd(qg, kg, vg, eg, sl(do, G), gam, bet, sw, sb,
                                                 dw, db)
    dq, dk, dv = (x.astype(dt) for x, dt in zip((dq, dk, dv), dts))
    return (dw, db, dgam + dgam_g, dbet + dbet_g), (dq, dk, dv, de)

  z = lambda *s: jnp.zeros(s, f32)
  (dw, db, dgam, dbet), (dq, dk, dv, de) = jax.lax.scan(
      body, (z(BH, F, F), z(BH, F), z(BH, F), z(BH, F)), jnp.arange(NG), reverse=True)

  def steps(a):  # [NG, BH, G, ...] -> [B, H, NC, ...]
    a = jnp.moveaxis(a, 0, 1).reshape((BH, NG * G) + a.shape[3:])[:, :NC]
    return a.reshape((B, H, NC) + a.shape[2:])

  per_h = lambda a: jnp.sum(a.reshape((B, H) + a.shape[1:]), axis=0)
  cast = lambda a, like: a.astype(like.dtype)
  return (cast(steps(dq), XQ), cast(steps(dk), XK), cast(steps(dv), XV), cast(steps(de), eta),
          cast(per_h(dgam), ln_weight), cast(per_h(dbet), ln_bias), cast(per_h(dw), W1),
          cast(per_h(db).reshape(H, 1, F), b1))


_ttt_linear_kernel.defvjp(_fwd, _bwd)


def ttt_linear_pallas(XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, *,
                      checkpoint_group_size: int = 16, ln_eps: float = 1e-6,
                      interpret: bool = False, variant: str = DEFAULT_VARIANT,
                      backward: str = "pallas"):
  """TTT-Linear with the fused forward kernel; same contract as `inner_loop.ttt_linear`.

  XQ, XK, XV [B, H, NC, CS, F] (bf16 or f32; the kernel reads bf16); eta [B, H, NC, CS];
  ln_weight, ln_bias [H, F]; W1 [H, F, F]; b1 [H, 1, F]. Returns [B, H, NC, CS, F] in XQ's dtype.
  `interpret=True` runs the kernel in Mosaic GPU interpret mode (CPU tests); `variant` picks the
  forward configuration (VARIANTS); `backward` the VJP (BACKWARDS: "pallas", the backward kernel,
  default; "xla_vjp", the XLA scan restarted from the checkpoints). Unsupported shapes or devices log one line and
  use the XLA scan.
  """
  if backward not in BACKWARDS:
    raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
  why = kernel_supported(XQ, interpret=interpret)
  if why is not None:
    logging.info("ttt_linear_pallas: falling back to the XLA scan: %s", why)
    return inner_loop.ttt_linear(XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1,
                                 checkpoint_group_size=checkpoint_group_size, ln_eps=ln_eps,
                                 implementation="xla")
  group = max(1, min(int(checkpoint_group_size), XQ.shape[2]))
  return _ttt_linear_kernel(XQ, XK, XV, eta, ln_weight, ln_bias, W1, b1, group, float(ln_eps),
                            bool(interpret), str(variant), str(backward))
