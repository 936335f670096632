"""Where a waited TTT-MLP forward call's time goes on the host (GPU only).

A waited forward call at NC=282 costs ~0.3 ms more than its kernels' device time plus JAX's dispatch
floor (`launch_overhead`: busy 4.14 ms, one waited call 4.50, `x + 1` 0.07). This script splits
that gap: per case it prints the median waited wall ms (`jax.block_until_ready`; `polled_ms`: the same
calls waited by spinning on `is_ready()`, no thread wake-up), the device busy ms (profiler trace), and
the host events of the trace (TraceMe names: dispatch, PjRt execute, thunks, custom calls) summed
per call, then one call's host timeline. Cases:
- `noop`: a jitted `x + 1` (the floor);
- `kernel`: the forward kernel alone under jit, on inputs already in the kernel's layout;
- `forward`: `ttt_mlp_pallas` (the wrapper's layout ops + the kernel), as the benchmarks time it;
- `matmul`: a control with no Mosaic GPU in it: a jitted chain of three 8192^3 bf16 matmuls (~4 ms
  of device time on an H100/H200, one argument): what any ~4 ms waited call pays beyond its kernels.
Found (H100, 2026-12-07): the control pays as much as the kernel (0.45-0.97 vs 0.49-0.85 ms
beyond device time; dispatch to first kernel 150-200 us, last kernel to next call 270-490 us):
the gap is JAX's per-call cost, not the kernel's (benchmarks/RESULTS.md).

  python -m benchmarks.host_trace [--nc 282] [--reps 20] [--cases noop,matmul,kernel,forward]
      [--variants v7pefsgrbc,v7pefsgrbci]
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import statistics
import sys

import jax
import jax.numpy as jnp

from benchmarks import device_trace
from benchmarks.kernel_common import median_ms
from benchmarks.ttt_mlp_kernel import make_inputs
from pallas_kernels.ttt_mlp import ttt_mlp as T


def kernel_case(args, group: int, variant: str | None = None):
  """(jitted raw kernel, its inputs in the kernel's layout) for `make_inputs` args (B=1)."""
  B, H, NC, CS, F = args[0].shape
  variant = T.default_variant(False) if variant is None else variant
  kargs = T.kernel_args(*args, variant)
  fn = T._build(B * H, NC, group, 1e-6, False, variant)  # noqa: SLF001
  return jax.jit(lambda *a: fn(*a)[0]), jax.block_until_ready(kargs)


def host_events(fn, args, reps: int):
  """({(thread, name): [durations ns]}, [(thread, name, start ns, dur ns)] sorted by start, the
  device's [(start ns, dur ns)]) of a trace of `reps` waited calls (fn already compiled)."""
  jax.block_until_ready(fn(*args))
  opts = jax.profiler.ProfileOptions()
  opts.python_tracer_level = 0  # (Python frames would add their own cost to every call)
  opts.host_tracer_level = 2
  data = device_trace.traced_calls(fn, args, reps, opts)
  durs = collections.defaultdict(list)
  events = []
  device = [(start, dur) for dat in data for _, start, dur in device_trace.device_events(dat)]
  for dat in data:
    for plane in dat.planes:
      if not plane.name.startswith("/host"):
        continue
      for line in plane.lines:
        for ev in line.events:
          key = (line.name[:24], ev.name[:100])
          durs[key].append(float(ev.duration_ns))
          events.append((line.name[:24], ev.name[:100], float(ev.start_ns), float(ev.duration_ns)))
  return durs, sorted(events, key=lambda e: e[2]), sorted(device)


def call_phases(events, device) -> dict:
  """Median us per waited call, from one trace's host and device events: `enqueue` (dispatch
  start to the end of PjRt's execute: all launches issued), `to_first_kernel` (dispatch start
  to the first kernel's start on the device), `after_enqueue` (execute's end to the first kernel's
  start: launch latency), `device` (first kernel start to last kernel end), `to_next_call` (last
  kernel end to the next call's dispatch: completion seen by the host, Python's loop)."""
  calls = [e for e in events if e[1].startswith("PjitFunction")]
  tops = [c for c in calls if not any(o is not c and o[2] <= c[2] and c[2] + c[3] <= o[2] + o[3]
                                      for o in calls)]
  execs = [e for e in events if e[1].startswith("PjRtCApiLoadedExecutable::Execute")]
  rows = collections.defaultdict(list)
  for i, c in enumerate(tops[:-1]):
    t0, t1 = c[2], tops[i + 1][2]
    dev = [d for d in device if t0 <= d[0] < t1]
    ex = [e for e in execs if t0 <= e[2] < t1]
    if not dev or not ex:
      continue
    first, last = dev[0][0], max(d[0] + d[1] for d in dev)
    enq = ex[0][2] + ex[0][3]
    for k, v in (("enqueue", enq - t0), ("to_first_kernel", first - t0),
                 ("after_enqueue", first - enq), ("device", last - first),
                 ("to_next_call", t1 - last)):
      rows[k].append(v / 1e3)
  return {k: round(statistics.median(v), 1) for k, v in rows.items()}


def report(name: str, fn, args, reps: int, top: int, timeline: int) -> None:
  wall = median_ms(fn, args, reps)
  polled = median_ms(fn, args, reps, wait="poll")
  busy = span = float("nan")
  if jax.default_backend() == "gpu":
    _, busy, span = device_trace.kernel_times(fn, args, min(reps, 5))
  print(json.dumps({"case": name, "waited_ms": wall, "polled_ms": polled, "busy_ms": busy,
                    "span_ms": span}), flush=True)
  durs, events, device = host_events(fn, args, reps)
  print("  phases (median us per call):", json.dumps(call_phases(events, device)))
  rows = sorted(((sum(v) / reps / 1e3, len(v) / reps, k) for k, v in durs.items()),
                key=lambda r: -r[0])
  print(f"  host events, us per call (top {top}):")
  for us, n, (thread, ev) in rows[:top]:
    print(f"  {us:9.1f} us {n:6.1f} x  [{thread}] {ev}")
  if events and timeline:
    # The last call: from the last dispatch (PjitFunction) on.
    starts = [e[2] for e in events if e[1].startswith("PjitFunction")]
    t0 = starts[-1] if starts else events[0][2]
    one = [e for e in events if e[2] >= t0]
    print(f"  one call's timeline ({len(one)} events; >= 2 us shown, first {timeline}):")
    for thread, ev, s, dur in [e for e in one if e[3] >= 2e3][:timeline]:
      print(f"  +{(s - t0) / 1e3:8.1f} us {dur / 1e3:8.1f} us  [{thread}] {ev}")
  sys.stdout.flush()


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--nc", type=int, default=282)
  p.add_argument("--heads", type=int, default=48)
  p.add_argument("--group", type=int, default=16)
  p.add_argument("--reps", type=int, default=20)
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--timeline", type=int, default=60)
  p.add_argument("--cases", default="noop,matmul,kernel,forward")
  p.add_argument("--variants", default="",
                 help="forward kernel variants for the kernel / forward cases, comma-separated "
                      "(default: ttt_mlp_pallas's)")
  a = p.parse_args(argv)
  cases = a.cases.split(",")
  unknown = sorted(set(cases) - {"noop", "matmul", "kernel", "forward"})
  if unknown:
    raise ValueError(f"unknown --cases {unknown} (of noop, matmul, kernel, forward)")
  variants = a.variants.split(",") if a.variants else [T.default_variant(False)]
  bad = sorted(set(variants) - set(T.VARIANTS))
  if bad:
    raise ValueError(f"unknown --variants {bad} (of {', '.join(T.VARIANTS)})")
  print("device:", jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
  args = jax.block_until_ready(make_inputs(jax.random.PRNGKey(1000), 1, a.heads, a.nc))
  for case in cases:
    if case == "noop":
      report(case, jax.jit(lambda x: x + 1), (jnp.zeros((8,), jnp.float32),), a.reps, a.top,
             a.timeline)
    elif case == "kernel":
      for v in variants:
        fn, kargs = kernel_case(args, a.group, v)
        report(f"{case} {v}", fn, kargs, a.reps, a.top, a.timeline)
    elif case == "forward":
      for v in variants:
        fn = jax.jit(functools.partial(T.ttt_mlp_pallas, checkpoint_group_size=a.group,
                                       variant=v))
        report(f"{case} {v}", fn, args, a.reps, a.top, a.timeline)
    else:  # matmul
      x = jax.random.normal(jax.random.PRNGKey(0), (8192, 8192), jnp.bfloat16) / 90.5
      report(case, jax.jit(lambda x: x @ x @ x @ x), (x,), a.reps, a.top, a.timeline)


if __name__ == "__main__":
  sys.exit(main())
