"""Benchmark + GPU correctness check: TTT-MLP "xla" scan vs the Pallas Mosaic GPU kernel.

impls: xla | pallas (the defaults: v3 forward + the Mosaic GPU backward kernel) | pallas_pbwd (the
same, named explicitly) | pallas_xlabwd (v3 forward, backward = XLA scan restarted from the kernel's
checkpoints; "pallas" before the backward kernel became the default) | other variants (impl_fns).

B=1, H=48, F=CS=64, hidden 256, NC in {282, 1000, 2750, 5500}; fresh random inputs per NC,
L2-normalised Q/K, eta ~1e-5 per token. Prints one table row per (NC, impl) and writes JSON to
--out (if given). Gradients are of sum(out * cot) with a bf16-valued cotangent (a bf16 output's
VJP receives one; --f32_cotangent gives the reference a float32 one, as before 2026-12-03). Times: `fwd_ms` / `fwdbwd_ms` one call at a time, waited; `*_in_flight` with
--in_flight calls dispatched back to back (the host's ~0.4 ms per call hidden, as in a model:
`benchmarks/launch_overhead.py`). Tolerances: outputs rel L2 < 1e-2, gradients < 2e-2 vs the float32 XLA scan.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernel_common import (add_reference_flags, conditioned_errors, in_flight_ms,
                                      median_ms, per_head_rel, reference_sensitivity, rel,
                                      summarize, ttt_inputs)
from pallas_kernels.ttt_mlp import ttt_mlp as T
from pallas_kernels.ttt_mlp import ttt_mlp_pallas
from ttt_dit.ttt import inner_loop


def make_inputs(key, B, H, NC, CS=64, F=64, eta_scale=1e-5, target="unit"):
  """Layer-shaped random inputs for this benchmark (`kernel_common.ttt_inputs`)."""
  return ttt_inputs(key, B, H, NC, hidden=4 * F, CS=CS, F=F, eta_scale=eta_scale, target=target)


GRAD_NAMES = ("XQ", "XK", "XV", "eta", "ln_w", "ln_b", "W1", "b1", "W2", "b2")


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--nc", default="282,1000,2750,5500")
  p.add_argument("--heads", type=int, default=48)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--group", type=int, default=16)
  p.add_argument("--grad_nc", default="282", help="NCs at which gradients are checked/timed")
  p.add_argument("--impls", default="xla,pallas")
  p.add_argument("--out", default="")
  p.add_argument("--in_flight", type=int, default=4,
                 help="calls dispatched back to back for the *_in_flight timings (host work hidden)")
  p.add_argument("--sensitivity", action="store_true")
  p.add_argument("--eta_scale", type=float, default=1e-5)
  p.add_argument("--target", default="unit", choices=("unit", "layer"),
                 help="V-target: random unit rows, or built from V and K as the layer does")
  p.add_argument("--f32_cotangent", action="store_true",
                 help="the reference's gradients of a float32 cotangent (the kernels' bf16 output "
                      "rounds it: ~8e-3 of the NC=282 gradient error is that rounding alone)")
  p.add_argument("--no_ref", action="store_true",
                 help="timing only: no float32 XLA reference (memory at NC=5500), no errors")
  add_reference_flags(p)
  a = p.parse_args(argv)
  dev = jax.devices()[0]
  print("device:", dev.device_kind, "jax", jax.__version__, flush=True)
  G = a.group
  f32 = lambda xs: tuple(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x for x in xs)
  impl_fns = {
      "xla": jax.jit(lambda *x: inner_loop.ttt_mlp(*x, checkpoint_group_size=G)),
      "pallas": jax.jit(lambda *x: ttt_mlp_pallas(*x, checkpoint_group_size=G)),
      "pallas_v1": jax.jit(lambda *x: ttt_mlp_pallas(*x, checkpoint_group_size=G, variant="v1")),
      "pallas_v2": jax.jit(lambda *x: ttt_mlp_pallas(*x, checkpoint_group_size=G, variant="v2")),
      "pallas_v3p": jax.jit(lambda *x: ttt_mlp_pallas(*x, checkpoint_group_size=G,
                                                      variant="v3_precise")),
      "pallas_v3x": jax.jit(lambda *x: ttt_mlp_pallas(*x, checkpoint_group_size=G,
                                                      variant="v3_exact")),
      "pallas_3pass": jax.jit(lambda *x: ttt_mlp_pallas(*x, checkpoint_group_size=G,
                                                        variant="v3_3pass")),
      "pallas_3pass_pbwd": jax.jit(lambda *x: ttt_mlp_pallas(  # 3-pass restarts too
          *x, checkpoint_group_size=G, variant="v3_3pass", backward="pallas")),
      "pallas_v3": jax.jit(lambda *x: ttt_mlp_pallas(*x, checkpoint_group_size=G, variant="v3")),
      "pallas_saved": jax.jit(lambda *x: ttt_mlp_pallas(*x, checkpoint_group_size=G,
                                                        backward="pallas_saved")),
      "pallas_qpass": jax.jit(lambda *x: ttt_mlp_pallas(*x, checkpoint_group_size=G,
                                                        backward="pallas_qpass")),
      "pallas_v4p": jax.jit(lambda *x: ttt_mlp_pallas(*x, checkpoint_group_size=G, variant="v4p")),
      "pallas_v4l": jax.jit(lambda *x: ttt_mlp_pallas(*x, checkpoint_group_size=G, variant="v4l")),
      "pallas_v6": jax.jit(lambda *x: ttt_mlp_pallas(*x, checkpoint_group_size=G, variant="v6")),
      **{f"pallas_{v}": jax.jit(lambda *x, v=v: ttt_mlp_pallas(*x, checkpoint_group_size=G,
                                                               variant=v))
         for v in ("v4",) + tuple(v for v in T.VARIANTS if v.startswith("v7"))},
      "pallas_3passf_pbwd": jax.jit(lambda *x: ttt_mlp_pallas(  # fresh-accumulator updates
          *x, checkpoint_group_size=G, variant="v3_3passf", backward="pallas")),
      "pallas_v5": jax.jit(lambda *x: ttt_mlp_pallas(*x, checkpoint_group_size=G, variant="v5")),
      "pallas_refbwd": jax.jit(lambda *x: ttt_mlp_pallas(*x, checkpoint_group_size=G,
                                                         backward="reference")),
      "pallas_pbwd": jax.jit(lambda *x: ttt_mlp_pallas(*x, checkpoint_group_size=G,
                                                       backward="pallas")),
      "pallas_xlabwd": jax.jit(lambda *x: ttt_mlp_pallas(*x, checkpoint_group_size=G,
                                                         backward="xla_vjp")),
  }

  def loss_fn(impl):
    def f(args, cot):
      return jnp.sum(impl(*args).astype(jnp.float32) * cot)
    return jax.jit(jax.value_and_grad(f))

  rows = []
  grad_ncs = {int(x) for x in a.grad_nc.split(",") if x}
  for i, NC in enumerate(int(x) for x in a.nc.split(",")):
    args = make_inputs(jax.random.PRNGKey(a.seed + i), 1, a.heads, NC, eta_scale=a.eta_scale,
                       target=a.target)
    ref = (jnp.zeros(args[0].shape, jnp.float32) if a.no_ref else
           jax.jit(lambda *x: inner_loop.ttt_mlp(*x, checkpoint_group_size=G))(*f32(args)))
    flops = inner_loop.ttt_mlp_flops(1, a.heads, NC)
    cot = jax.random.normal(jax.random.PRNGKey(7 + i), ref.shape, jnp.float32)
    if not a.f32_cotangent:  # the kernels' output is bf16, so their VJP gets a bf16 cotangent: the
      cot = cot.astype(jnp.bfloat16).astype(jnp.float32)  # reference gets the same values
    if a.sensitivity:  # the float32 scan itself, W1 perturbed by 1e-6 relative
      pert = list(f32(args))
      pert[6] = pert[6] * (1 + 1e-6)
      ref2 = jax.jit(lambda *x: inner_loop.ttt_mlp(*x, checkpoint_group_size=G))(*pert)
      q32 = args[0].astype(jnp.float32)
      print(json.dumps({"NC": NC, "ref_sensitivity_W1_1e-6": rel(ref2 - q32, ref - q32)}), flush=True)
    gref, cond = None, None
    if NC in grad_ncs and not a.no_ref:
      gref = loss_fn(impl_fns["xla"])(f32(args), cot)[1]
      if a.grad_sensitivity:  # the reference against itself, W1 moved by ~1 ulp
        cond, report = reference_sensitivity(loss_fn(impl_fns["xla"]), f32(args), cot, gref,
                                             GRAD_NAMES, a.grad_sensitivity, a.conditioned_below)
        print(json.dumps({"NC": NC, **report}), flush=True)
      if a.ref_repeat:  # the same inputs again: any difference is the device's own nondeterminism
        report = reference_sensitivity(loss_fn(impl_fns["xla"]), f32(args), cot, gref, GRAD_NAMES,
                                       0.0, a.conditioned_below)[1]
        print(json.dumps({"NC": NC, "ref_repeat": True, **report}), flush=True)
    for name in a.impls.split(","):
      fn = impl_fns[name]
      out = fn(*args)
      row = dict(NC=NC, impl=name, device=dev.device_kind, eta_scale=a.eta_scale, target=a.target,
                 out_rel=rel(out.astype(jnp.float32) - args[0].astype(jnp.float32),
                             ref - args[0].astype(jnp.float32)),
                 out_rel_full=rel(out, ref), finite=bool(jnp.isfinite(out.astype(jnp.float32)).all()))
      if a.no_ref:  # no reference: errors would be against zeros
        row.update(out_rel=float("nan"), out_rel_full=float("nan"))
      else:
        bounds = [b for b in (0, 282, 1000, 2750, 5500) if b < NC] + [NC]
        q32 = args[0].astype(jnp.float32)
        row["out_rel_windows"] = {
            f"{lo}-{hi}": rel(out[:, :, lo:hi].astype(jnp.float32) - q32[:, :, lo:hi],
                              ref[:, :, lo:hi] - q32[:, :, lo:hi])
            for lo, hi in zip(bounds[:-1], bounds[1:])}
      row["fwd_ms"] = median_ms(fn, args, a.reps)  # one call at a time, waited
      row["fwd_ms_polled"] = median_ms(fn, args, a.reps, wait="poll")  # ... by spinning
      row["fwd_ms_in_flight"] = in_flight_ms(fn, args, a.in_flight, max(2, a.reps // 2))
      row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
      if NC in grad_ncs:
        lf = loss_fn(fn)
        _, g = lf(args, cot)
        names = GRAD_NAMES
        fin = lambda x: bool(jnp.isfinite(x.astype(jnp.float32)).all())
        row["grad_finite"] = all(fin(x) for x in g)
        if gref is not None:
          row["grad_rel"] = {k: rel(x, y) for k, x, y in zip(names, g, gref)}
          ph = per_head_rel(g[1], gref[1])  # XK per head: the global error is decided by a few
          row["grad_rel_xk_per_head"] = dict(  # ill-conditioned heads (NOTES-ttt-mlp.md)
              median=float(np.median(ph)), max=float(ph.max()), argmax=int(ph.argmax()),
              heads_over_2e_2=int((ph >= 2e-2).sum()))
          row["gref_finite"] = all(fin(x) for x in gref)
          row.update(conditioned_errors(g, gref, cond, names))
          row["xk_per_head_worst"] = {int(h): float(ph[h]) for h in np.argsort(ph)[::-1][:6]}
        row["fwdbwd_ms"] = median_ms(lf, (args, cot), max(2, a.reps // 2))
        row["fwdbwd_ms_in_flight"] = in_flight_ms(lf, (args, cot), a.in_flight, 2)
        # nominal: backward counted as 2x the forward's FLOPs (no recompute counted)
        row["fwdbwd_tflops_nominal"] = 3 * flops / row["fwdbwd_ms"] / 1e9
      try:
        row["peak_gib"] = dev.memory_stats()["peak_bytes_in_use"] / 2**30
      except Exception:  # noqa: BLE001 (CPU has no memory stats)
        row["peak_gib"] = None
      rows.append(row)
      print(json.dumps(row), flush=True)
  summarize(rows, a.out)


if __name__ == "__main__":
  sys.exit(main())
