"""TTT-MLP Pallas backward: the default kernel vs `BwdTuningConfig(dw_gmem=True)` (one H100).

  python -m benchmarks.ttt_mlp_bwd_dwgmem kernel   # one group (H=48, G=16): kernel ms, output diff
  python -m benchmarks.ttt_mlp_bwd_dwgmem e2e      # NC=282, 1000: gradients + fwd+bwd / bwd ms
  python -m benchmarks.ttt_mlp_bwd_dwgmem time 282,1000   # timings only

dw_gmem keeps the float32 state cotangents dW1, dW2 in the dw outputs in GMEM (L2) instead of 128
accumulator registers per thread carried through the step loop (ptxas spills in the update
reverse). e2e: gradients of both vs jax.grad of the float32 XLA scan at NC=282 and vs each other;
the backward timed alone (jit of the vjp) and with the forward (value_and_grad), each variant
measured twice, interleaved.
"""

from __future__ import annotations

import functools
import json
import sys

import jax
import jax.numpy as jnp

from benchmarks.kernel_common import median_ms, rel
from benchmarks.ttt_mlp_bwd_ablate import group_setup
from benchmarks.ttt_mlp_kernel import make_inputs
from pallas_kernels.ttt_mlp import kernel_bwd_mgpu, ttt_mlp_pallas
from ttt_dit.ttt import inner_loop

NAMES = ("XQ", "XK", "XV", "eta", "ln_w", "ln_b", "W1", "b1", "W2", "b2")
VARIANTS = ("pallas", "pallas_dw_gmem")


def kernel(H=48, NC=282, G=16, reps=10):
  q, k, v, e, do, gam, bet, ck, fwd = group_setup(H, NC, G)
  _, sw1, _, sb1, sw2, _, sb2 = fwd(q, k, v, e, gam, bet, *(a[:, 0] for a in ck))
  z = lambda key, *s: 1e-3 * jax.random.normal(jax.random.PRNGKey(key), s, jnp.float32)
  bargs = (q, k, v, e, do, gam, bet, sw1, sb1, sw2, sb2, z(3, H, 4, 64, 64), z(4, H, 4, 64),
           z(5, H, 4, 64, 64), z(6, H, 64))
  fns = {g: jax.jit(kernel_bwd_mgpu.build_backward(
      H, G, 1e-6, config=kernel_bwd_mgpu.BwdTuningConfig(dw_gmem=g))) for g in (False, True)}
  outs = {g: fns[g](*bargs) for g in fns}
  names = ("dq", "dk", "dv", "de", "dgam", "dbet", "dw1", "db1", "dw2", "db2")
  print(json.dumps({"kernel_out_rel_dw_gmem_vs_default": {
      n: rel(a, b) for n, a, b in zip(names, outs[True], outs[False])}}), flush=True)
  for _ in range(2):
    for g in (False, True):
      t = median_ms(fns[g], bargs, reps)
      print(f"backward kernel dw_gmem={g}: {t:8.3f} ms  {t * 1e3 / G:7.2f} us/step", flush=True)


def e2e(ncs=(282, 1000), H=48, G=16, reps=5, ref_nc=282, with_grads=True, variants=VARIANTS):
  for i, NC in enumerate(ncs):
    args = make_inputs(jax.random.PRNGKey(1000 + i), 1, H, NC)
    cot = jax.random.normal(jax.random.PRNGKey(7 + i), args[0].shape, jnp.float32)

    def lossf(impl):
      return jax.jit(jax.value_and_grad(lambda a, c: jnp.sum(impl(*a).astype(jnp.float32) * c)))

    grads, lfs, bwds = {}, {}, {}
    for b in variants:
      f = functools.partial(ttt_mlp_pallas, checkpoint_group_size=G, backward=b)
      lfs[b] = lossf(f)
      out, vjp = jax.vjp(f, *args)
      bwds[b] = (jax.jit(vjp), (cot.astype(out.dtype),))
      if not with_grads:
        continue
      grads[b] = lfs[b](args, cot)[1]
      print(json.dumps({"NC": NC, "impl": b, "grad_finite": all(
          bool(jnp.isfinite(x.astype(jnp.float32)).all()) for x in grads[b])}), flush=True)
    if with_grads:
      print(json.dumps({"NC": NC, "grad_rel_dw_gmem_vs_default": {
          n: rel(x, y) for n, x, y in zip(NAMES, grads[VARIANTS[1]], grads[VARIANTS[0]])}}),
            flush=True)
    if with_grads and NC == ref_nc:
      f32 = tuple(a.astype(jnp.float32) for a in args)
      gref = lossf(lambda *x: inner_loop.ttt_mlp(*x, checkpoint_group_size=G))(f32, cot)[1]
      for b in VARIANTS:
        gr = {n: rel(x, y) for n, x, y in zip(NAMES, grads[b], gref)}
        print(json.dumps({"NC": NC, "impl": b, "grad_rel_vs_xla_f32": gr,
                          "max": max(gr.values())}), flush=True)
      del gref
    for _ in range(2):
      for b in variants:
        tb = median_ms(*bwds[b], reps)
        tf = median_ms(lfs[b], (args, cot), max(2, reps // 2))
        print(json.dumps({"NC": NC, "impl": b, "device": jax.devices()[0].device_kind,
                          "bwd_ms": round(tb, 2), "fwdbwd_ms": round(tf, 2)}), flush=True)
    del grads, lfs, bwds


if __name__ == "__main__":
  print("device:", jax.devices()[0].device_kind, flush=True)
  what = sys.argv[1] if len(sys.argv) > 1 else "kernel"
  if what == "kernel":
    kernel()
  else:  # e2e [NCs] (gradients + timings) | time [NCs] (timings only)
    e2e(tuple(int(x) for x in sys.argv[2].split(",")) if len(sys.argv) > 2 else (282, 1000),
        with_grads=what == "e2e", variants=tuple(sys.argv[3].split(",")) if len(sys.argv) > 3
        else VARIANTS)
