"""Benchmark + GPU correctness check: TTT-Linear "xla" scan vs the Pallas Mosaic GPU kernel.

impls: xla | pallas (the defaults: forward variant + the backward kernel, backward="pallas") |
pallas_xbwd (default forward, backward = XLA scan VJP from the kernel's checkpoints) |
pallas_primal, pallas_dual, pallas_pf, pallas_dual_pf, pallas_split, pallas_dual_split (forward variants, see
`pallas_kernels.ttt_linear.ttt_linear.VARIANTS`). (Before 2026-11-23 07:00 "pallas" named the
xla_vjp backward and "pallas_pbwd" the backward kernel; RESULTS.md says which.)

B=1, H=48, F=CS=64, NC in {282, 1000, 2750, 5500}; fresh random inputs per NC, L2-normalised Q/K,
bf16 Q/K/V, eta ~ eta_scale per token (1e-5 timed and checked; --eta_scales adds more, checked
only). Errors are rel L2 vs the float32 XLA scan: outputs as rel L2 of (out - Q) (the residual
hides nothing), gradients of sum(out * cot) for all eight inputs. One JSON row per (eta, NC, impl)
and a table; --out writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernel_common import (add_reference_flags, conditioned_errors, median_ms,
                                      per_head_rel, reference_sensitivity, rel, summarize,
                                      ttt_inputs)
from pallas_kernels.ttt_linear import ttt_linear_pallas
from pallas_kernels.ttt_linear.ttt_linear import DEFAULT_VARIANT
from ttt_dit.ttt import inner_loop

NAMES = ("XQ", "XK", "XV", "eta", "ln_w", "ln_b", "W1", "b1")


def ttt_linear_flops(B: int, H: int, NC: int, CS: int = 64, F: int = 64) -> float:
  """Matmul FLOPs of the dual-form forward: K W1, Q W1, Q K^T, (eta A) G1, K^T (eta G1)."""
  return float(B * H * NC * 2 * CS * (3 * F * F + 2 * CS * F))


def make_inputs(key, B, H, NC, CS=64, F=64, eta_scale=1e-5):
  """Layer-shaped random inputs for this benchmark (`kernel_common.ttt_inputs`)."""
  return ttt_inputs(key, B, H, NC, hidden=None, CS=CS, F=F, eta_scale=eta_scale)


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--nc", default="282,1000,2750,5500")
  p.add_argument("--heads", type=int, default=48)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--group", type=int, default=16)
  p.add_argument("--grad_nc", default="282,1000,2750,5500",
                 help="NCs at which gradients are checked and fwd+bwd timed")
  p.add_argument("--impls", default="xla,pallas")
  p.add_argument("--grad_impls", default="xla,pallas", help="impls whose gradients are run")
  p.add_argument("--eta_scales", default="1e-5,1e-6",
                 help="first: timed and checked; the others: errors only")
  p.add_argument("--eta2_nc", default="", help="NCs for the error-only eta scales (default --nc)")
  p.add_argument("--interpret", action="store_true",
                 help="kernels in Mosaic GPU interpret mode (a CPU check of this script, tiny sizes)")
  p.add_argument("--out", default="")
  add_reference_flags(p)
  a = p.parse_args(argv)
  dev = jax.devices()[0]
  print("device:", dev.device_kind, "jax", jax.__version__, flush=True)
  G = a.group
  f32 = lambda xs: tuple(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x for x in xs)
  pallas = lambda variant, backward="pallas": jax.jit(lambda *x: ttt_linear_pallas(
      *x, checkpoint_group_size=G, variant=variant, backward=backward, interpret=a.interpret))
  impl_fns = {
      "xla": jax.jit(lambda *x: inner_loop.ttt_linear(*x, checkpoint_group_size=G)),
      "pallas": pallas(DEFAULT_VARIANT),
      "pallas_xbwd": pallas(DEFAULT_VARIANT, "xla_vjp"),
      "pallas_primal": pallas("primal"),
      "pallas_dual": pallas("dual"),
      "pallas_pf": pallas("primal_prefetch"),
      "pallas_dual_pf": pallas("dual_prefetch"),
      "pallas_split": pallas("primal_prefetch_split"),
      "pallas_dual_split": pallas("dual_prefetch_split"),
      "pallas_wide": pallas("primal_prefetch_split_wide", "pallas_wide"),  # 8 KiB reduction scratch
  }

  def loss_fn(impl):
    def f(args, cot):
      return jnp.sum(impl(*args).astype(jnp.float32) * cot)
    return jax.jit(jax.value_and_grad(f))

  rows = []
  grad_ncs = {int(x) for x in a.grad_nc.split(",") if x}
  etas = [float(x) for x in a.eta_scales.split(",") if x]
  grad_impls = set(a.grad_impls.split(","))
  for ei, eta_scale in enumerate(etas):
    timed = ei == 0
    ncs = a.nc if timed or not a.eta2_nc else a.eta2_nc
    for i, NC in enumerate(int(x) for x in ncs.split(",")):
      args = make_inputs(jax.random.PRNGKey(a.seed + i), 1, a.heads, NC, eta_scale=eta_scale)
      q32 = args[0].astype(jnp.float32)
      ref = impl_fns["xla"](*f32(args))
      cot = jax.random.normal(jax.random.PRNGKey(7 + i), ref.shape, jnp.float32)
      cot = cot.astype(jnp.bfloat16).astype(jnp.float32)  # bf16-valued: what the kernel's VJP gets
      gref, cond = None, None
      if NC in grad_ncs:
        try:
          gref = loss_fn(impl_fns["xla"])(f32(args), cot)[1]
          if a.grad_sensitivity:  # the reference against itself, W1 moved by ~1 ulp
            cond, report = reference_sensitivity(loss_fn(impl_fns["xla"]), f32(args), cot, gref,
                                                 NAMES, a.grad_sensitivity, a.conditioned_below)
            print(json.dumps({"NC": NC, "eta_scale": eta_scale, **report}), flush=True)
          if a.ref_repeat:  # the same inputs again: any difference is the device's nondeterminism
            report = reference_sensitivity(loss_fn(impl_fns["xla"]), f32(args), cot, gref, NAMES,
                                           0.0, a.conditioned_below)[1]
            print(json.dumps({"NC": NC, "eta_scale": eta_scale, "ref_repeat": True, **report}),
                  flush=True)
        except Exception as e:  # noqa: BLE001
          print(json.dumps({"NC": NC, "gref_error": f"{type(e).__name__}: {str(e)[:200]}"}))
      flops = ttt_linear_flops(1, a.heads, NC)
      for name in a.impls.split(","):
        fn = impl_fns[name]
        out = fn(*args)
        row = dict(NC=NC, impl=name, device=dev.device_kind, eta_scale=eta_scale, group=G,
                   out_rel=rel(out.astype(jnp.float32) - q32, ref - q32),
                   finite=bool(jnp.isfinite(out.astype(jnp.float32)).all()))
        if timed:
          row["fwd_ms"] = median_ms(fn, args, a.reps)
          row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
        if gref is not None and name in grad_impls:
          try:
            lf = loss_fn(fn)
            _, g = lf(args, cot)
            row["grad_rel"] = {k: rel(x, y) for k, x, y in zip(NAMES, g, gref)}
            row["grad_finite"] = all(bool(jnp.isfinite(x.astype(jnp.float32)).all()) for x in g)
            ph = per_head_rel(g[1], gref[1])  # XK per head
            row["xk_per_head_worst"] = {int(h): float(ph[h]) for h in np.argsort(ph)[::-1][:6]}
            row.update(conditioned_errors(g, gref, cond, NAMES))
            del g
            if timed:
              row["fwdbwd_ms"] = median_ms(lf, (args, cot), max(2, a.reps // 2))
              # nominal: backward counted as 2x the forward's FLOPs (no recompute counted)
              row["fwdbwd_tflops_nominal"] = 3 * flops / row["fwdbwd_ms"] / 1e9
          except Exception as e:  # noqa: BLE001 (e.g. out of memory at long NC: keep going)
            row["grad_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        try:
          row["peak_gib"] = dev.memory_stats()["peak_bytes_in_use"] / 2**30
        except Exception:  # noqa: BLE001 (CPU has no memory stats)
          row["peak_gib"] = None
        rows.append(row)
        print(json.dumps(row), flush=True)
      del args, ref, gref
  summarize(rows, a.out)


if __name__ == "__main__":
  sys.exit(main())
