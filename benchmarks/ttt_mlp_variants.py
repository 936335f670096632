"""A/B of TTT-MLP forward kernel variants on one GPU: bitwise against a baseline, then timed.

For each NC, every variant's raw kernel (`ttt_mlp._forward_raw`: outputs and the six checkpoint
arrays) runs on the same fresh random inputs and is compared element for element with the first
variant's (a variant meant to do the same arithmetic must match bitwise; otherwise the max
relative difference is printed). Then the variants are timed interleaved over `--rounds`
rounds (median ms per call, waited by `block_until_ready` and by polling `is_ready()`, and per
call with `--in_flight` calls dispatched back to back), so a drift of the machine's clocks falls
on all of them alike. A variant other than the baseline that fails to compile or run (SMEM,
ptxas) is reported with its error and left out of the timings, so one bad variant does not cost
the device call.

  python -m benchmarks.ttt_mlp_variants --nc 282,1000 --variants v7pefsgr,v7pefsgrb   (GPU)
  python -m benchmarks.ttt_mlp_variants --nc 3 --heads 1 --variants v4,v3 --interpret   (CPU smoke)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks.kernel_common import in_flight_ms, median_ms
from benchmarks.ttt_mlp_kernel import make_inputs
from pallas_kernels.ttt_mlp import ttt_mlp as T


def compare(base: tuple, other: tuple) -> dict:
  """{'bitwise': all arrays equal, 'max_rel': max over arrays of max |a - b| / max |a|} (the
  outputs, and the checkpoints where both have them)."""
  flat = lambda r: (r[0],) + tuple(r[1])
  rels = []
  for a, b in zip(flat(base), flat(other)):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    rels.append(float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(a)), 1e-30)))
  return {"bitwise": all(r == 0.0 for r in rels), "max_rel": max(rels)}


def parse_variant(spec: str) -> tuple[str, int | None, bool]:
  """"v7pefsgr" -> ("v7pefsgr", None, True); "v7pefsgr@4096" -> ("v7pefsgr", 4096, True): a v7
  variant with that many bytes of reduction scratch (`ttt_mlp._build`); a ":lean" suffix (v7)
  -> checkpoints False: the kernel writes none (what a forward nothing differentiates runs)."""
  spec, lean = (spec[:-5], True) if spec.endswith(":lean") else (spec, False)
  name, _, red = spec.partition("@")
  if name not in T.VARIANTS:
    raise SystemExit(f"--variants: {name!r} is not one of {T.VARIANTS}")
  if red and not (red.isdigit() and name.startswith("v7")):
    raise SystemExit(f"--variants: {spec!r}: '@' takes a byte count, for v7 variants only")
  if lean and not name.startswith("v7"):
    raise SystemExit(f"--variants: {spec!r}: ':lean' is for v7 variants only")
  return name, int(red) if red else None, not lean


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--nc", default="282,1000", help="comma-separated mini-batch counts")
  p.add_argument("--variants", default="v7pefsgr",
                 help="comma-separated, the first the baseline; NAME@BYTES: v7 with that reduction "
                      "scratch; NAME:lean: v7 without checkpoints")
  p.add_argument("--heads", type=int, default=48)
  p.add_argument("--group", type=int, default=16, help="checkpoint group size")
  p.add_argument("--eta_scale", type=float, default=1e-5)
  p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
  p.add_argument("--reps", type=int, default=5, help="waited calls per variant and round")
  p.add_argument("--in_flight", type=int, default=4, help="calls dispatched back to back")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--interpret", action="store_true", help="Mosaic GPU interpret mode (CPU smoke run)")
  p.add_argument("--out", default="", help="JSON file for the rows")
  a = p.parse_args(argv)
  variants = a.variants.split(",")
  specs = {v: parse_variant(v) for v in variants}
  print("device:", jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
  rows = []
  for i, NC in enumerate(int(x) for x in a.nc.split(",")):
    args = make_inputs(jax.random.PRNGKey(a.seed + i), 1, a.heads, NC, eta_scale=a.eta_scale)
    fns, outs, failed = {}, {}, {}
    for v in dict.fromkeys(variants):  # compile and run each once (reported as it goes)
      t0 = time.perf_counter()
      fn = jax.jit(lambda *x, s=specs[v]: T._forward_raw(
          *x, group=a.group, ln_eps=1e-6, interpret=a.interpret, variant=s[0],
          reduction_scratch=s[1], checkpoints=s[2]))
      try:
        outs[v] = jax.block_until_ready(fn(*args))
      except Exception as e:  # noqa: BLE001 (a variant that fails to build or run is reported,
        if v == variants[0]:  # not timed; the others still are; the baseline must work)
          raise
        failed[v] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:400]}"
        print(json.dumps({"NC": NC, "variant": v, "error": failed[v]}), flush=True)
        continue
      fns[v] = fn
      first_s = round(time.perf_counter() - t0, 1)
      print(json.dumps({"NC": NC, "variant": v, "first_call_s": first_s}), flush=True)
    cmp = {v: compare(outs[variants[0]], outs[v]) for v in variants[1:] if v in outs}
    del outs
    print(json.dumps({"NC": NC, "vs": variants[0], **cmp}), flush=True)
    timed = [v for v in variants if v in fns]
    waited = {v: [] for v in timed}
    polled = {v: [] for v in timed}
    flying = {v: [] for v in timed}
    for _ in range(a.rounds):
      for v in timed:
        waited[v].append(median_ms(fns[v], args, a.reps))
        polled[v].append(median_ms(fns[v], args, a.reps, wait="poll"))
        flying[v].append(in_flight_ms(fns[v], args, a.in_flight, 2))
    for v in variants:
      if v in failed:
        rows.append(dict(NC=NC, variant=v, device=jax.devices()[0].device_kind, error=failed[v]))
        continue
      row = dict(NC=NC, variant=v, device=jax.devices()[0].device_kind,
                 fwd_ms=statistics.median(waited[v]), fwd_ms_rounds=waited[v],
                 fwd_ms_polled=statistics.median(polled[v]),
                 fwd_ms_in_flight=statistics.median(flying[v]), in_flight_rounds=flying[v],
                 **cmp.get(v, {"bitwise": True, "max_rel": 0.0}))
      rows.append(row)
      print(json.dumps(row), flush=True)
  if a.out:
    with open(a.out, "w") as fh:
      json.dump(rows, fh, indent=1)
  return rows


if __name__ == "__main__":
  main()
