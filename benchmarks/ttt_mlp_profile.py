"""Where the TTT-MLP kernels' step time goes: Mosaic GPU's on-device profiler, one H100.

Each kernel's step is split into named phases (`mgpu_common.Phases`: "load", "z1", "xchg", ...).
With `Profile` the kernel records SM clock cycles at every phase boundary per warpgroup; this
script runs forward variants (`--which` v3, v4, v4p, v5, v6, v7*: v7, v7pe, v7pefs, v7pefsg, ...) over `--nc` mini-batches and the backward
kernel (bwd) over `--bwd_steps` steps, for each `--red` reduction scratch size, and prints per
phase the median and mean cycles per occurrence over all CTAs and the us per step at the SM clock
`--ghz`, next to the unprofiled kernel's wall time per step.

  python -m benchmarks.ttt_mlp_profile --nc 48 --out /tmp/prof   (GPU only)
"""

from __future__ import annotations

import argparse
import collections
import glob
import itertools
import json
import os
import statistics
import sys
import tempfile

import jax
import jax.numpy as jnp

from benchmarks.kernel_common import median_ms
from benchmarks.ttt_mlp_kernel import make_inputs
from pallas_kernels.mgpu_common import Profile
from pallas_kernels.ttt_mlp import (kernel_acc_mgpu, kernel_bwd_mgpu, kernel_wg2_mgpu,
                                    kernel_ws_mgpu)
from pallas_kernels.ttt_mlp import ttt_mlp as T


def phase_cycles(trace: dict) -> tuple[dict[str, list[float]], dict[str, int]]:
  """({phase: [cycles of each occurrence, all warpgroup traces]}, {phase: number of warpgroup
  traces that record it}) from a Perfetto trace dict (v7's two warpgroups run different phases).
  Durations are SM clock cycles: the profiler's `ts` is (start ns + cycles since start) / 1e3."""
  out = collections.defaultdict(list)
  open_at, traces = {}, collections.defaultdict(set)
  for ev in trace["traceEvents"]:
    key = (ev["pid"], ev["tid"], ev["name"])
    traces[ev["name"]].add(key[:2])
    if ev["ph"] == "B":
      open_at[key] = ev["ts"]
    elif key in open_at:
      out[ev["name"]].append((ev["ts"] - open_at.pop(key)) * 1e3)
  return dict(out), {k: len(v) for k, v in traces.items()}


def latest_trace(directory: str) -> dict:
  """The newest `*-trace.json` the profiler wrote into `directory`."""
  files = sorted(glob.glob(os.path.join(directory, "*-trace.json")))
  if not files:
    raise FileNotFoundError(f"no profiler trace (*-trace.json) in {directory}")
  with open(files[-1]) as fh:
    return json.load(fh)


def report(title: str, cycles: dict[str, list[float]], n_traces: dict[str, int], steps: int,
           ghz: float, wall_us: float) -> dict:
  """Prints per phase: occurrences, median and mean cycles, us per step at `ghz` (per warpgroup
  that runs the phase), share. With warpgroups of different roles (v7) the phases of all roles
  are summed: the total is then more than any one warpgroup's step."""
  per_step = {k: sum(xs) / n_traces[k] / steps for k, xs in cycles.items()}  # cycles per step
  total = sum(per_step.values())
  print(f"\n## {title}: {max(n_traces.values())} warpgroup traces, {steps} steps; unprofiled wall "
        f"{wall_us:.2f} us/step; phases sum to {total:.0f} cycles = {total / ghz / 1e3:.2f} us/step")
  print(f"{'phase':10s} {'n':>6s} {'med cyc':>8s} {'mean cyc':>8s} {'us/step':>8s} {'share':>6s}")
  rows = {}
  for k, xs in cycles.items():
    med, mean = statistics.median(xs), statistics.mean(xs)
    print(f"{k:10s} {len(xs):6d} {med:8.0f} {mean:8.0f} {per_step[k] / ghz / 1e3:8.2f} "
          f"{per_step[k] / total:6.1%}")
    rows[k] = {"n": len(xs), "median_cycles": med, "mean_cycles": mean,
               "us_per_step": per_step[k] / ghz / 1e3}
  return rows


def raw_forward_args(args, B: int):
  """make_inputs(...) -> the forward kernel's raw arguments (kernel layout, [BH, ...])."""
  XQ, XK, XV, eta, lw, lb, W1, b1, W2, b2 = args
  _, H, NC, CS, F = XQ.shape
  bf = lambda a: a.astype(jnp.bfloat16).reshape(B * H, NC, CS, F)
  return (bf(XQ), bf(XK), bf(XV), eta.astype(jnp.float32).reshape(B * H, NC, CS),
          T._per_head(lw, B), T._per_head(lb, B), *T._to_kernel_state(W1, b1, W2, b2, B))


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--nc", type=int, default=48, help="forward mini-batches profiled")
  p.add_argument("--heads", type=int, default=48)
  p.add_argument("--group", type=int, default=16)
  p.add_argument("--ghz", type=float, default=1.98, help="SM clock for cycles -> us (H100 under load: 1980 MHz)")
  p.add_argument("--reps", type=int, default=10)
  p.add_argument("--which", default="v4,v3,bwd")
  p.add_argument("--red", default="2048", help="reduction scratch bytes to compare (comma list)")
  p.add_argument("--bwd_steps", type=int, default=8, help="backward steps profiled (even)")
  p.add_argument("--ranges", type=int, default=16,
                 help="v7: profiler ranges recorded per step and warpgroup (16 bytes of SMEM each)")
  p.add_argument("--out", default="", help="JSON summary path")
  a = p.parse_args(argv)
  print("device:", jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
  H, NC, G = a.heads, a.nc, a.group  # G: the forward's checkpoint group
  summary = {}
  args = make_inputs(jax.random.PRNGKey(0), 1, H, NC)
  fargs = raw_forward_args(args, 1)
  for which, red in itertools.product(a.which.split(","), (int(r) for r in a.red.split(","))):
    d = tempfile.mkdtemp(prefix=f"prof_{which}_")
    title = f"{which} reduction_scratch={red}"
    if which in ("v5", "v4p", "v4", "v3"):
      cfg = kernel_acc_mgpu.AccTuningConfig(pipeline=which != "v3", early_gelu_grad=which == "v5",
                                            prefetch_next=which == "v4p", reduction_scratch=red)
      plain = jax.jit(kernel_acc_mgpu.build_forward_acc(H, NC, G, 1e-6, config=cfg))
      wall = median_ms(plain, fargs, a.reps) * 1e3 / NC
      prof = jax.jit(kernel_acc_mgpu.build_forward_acc(
          H, NC, G, 1e-6, config=cfg, profile=Profile(d, space=12 * NC + 16)))
      kargs, steps = fargs, NC
    elif which == "v6":  # two warpgroups per CTA: each records its own trace
      cfg6 = kernel_wg2_mgpu.Wg2TuningConfig(reduction_scratch=red)
      plain = jax.jit(kernel_wg2_mgpu.build_forward_wg2(H, NC, G, 1e-6, config=cfg6))
      wall = median_ms(plain, fargs, a.reps) * 1e3 / NC
      prof = jax.jit(kernel_wg2_mgpu.build_forward_wg2(
          H, NC, G, 1e-6, config=cfg6, profile=Profile(d, space=12 * NC + 16)))
      kargs, steps = fargs, NC
    elif which.startswith("v7"):  # keys' and queries' warpgroups (v7pefsg, ...)
      cfg7 = kernel_ws_mgpu.WsTuningConfig.from_variant(which, reduction_scratch=red)
      plain = jax.jit(kernel_ws_mgpu.build_forward_ws(H, NC, G, 1e-6, config=cfg7))
      wall = median_ms(plain, fargs, a.reps) * 1e3 / NC
      prof = jax.jit(kernel_ws_mgpu.build_forward_ws(
          H, NC, G, 1e-6, config=cfg7, profile=Profile(d, space=a.ranges * NC + 16)))
      kargs, steps = fargs, NC
    elif which == "bwd":
      S = a.bwd_steps
      q, k, v = (x.reshape(H, NC, 64, 64)[:, :S + 1] for x in fargs[:3])
      e = fargs[3][:, :S + 1]
      do = jax.random.normal(jax.random.PRNGKey(1), (H, S, 64, 64)).astype(jnp.bfloat16)
      restart = jax.jit(T._build(H, S + 1, 1, 1e-6, False, "v3"))
      _, sw1, _, sb1, sw2, _, sb2 = restart(q, k, v, e, *fargs[4:])
      z = lambda *s: 1e-3 * jnp.ones(s, jnp.float32)
      kargs = (q, k, v, e, do, *fargs[4:6], sw1, sb1, sw2, sb2, z(H, 4, 64, 64), z(H, 4, 64),
               z(H, 4, 64, 64), z(H, 64))
      cfg = kernel_bwd_mgpu.BwdTuningConfig(reduction_scratch=red)
      plain = jax.jit(kernel_bwd_mgpu.build_backward(H, S, 1e-6, config=cfg))
      wall = median_ms(plain, kargs, a.reps) * 1e3 / S
      prof = jax.jit(kernel_bwd_mgpu.build_backward(H, S, 1e-6, config=cfg,
                                                    profile=Profile(d, space=28 * S + 16)))
      steps = S
    else:
      raise ValueError(f"--which: unknown kernel {which!r} (v7*, v6, v5, v4p, v4, v3, bwd)")
    same = all(bool(jnp.array_equal(x, y)) for x, y in zip(plain(*kargs), prof(*kargs)))
    print(f"{title}: profiled results bitwise equal to unprofiled: {same}", flush=True)
    summary[title] = {"wall_us_per_step": wall,
                      "phases": report(title, *phase_cycles(latest_trace(d)), steps, a.ghz, wall)}
  if a.out:
    with open(a.out, "w") as fh:
      json.dump(summary, fh, indent=1)


if __name__ == "__main__":
  sys.exit(main())
