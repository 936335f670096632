"""Per-kernel device time of a jitted call, from a `jax.profiler` trace (GPU attribution).

Wall-clock medians say how long a call takes; this says which kernels the time is spent in:
the call runs `reps` times under `jax.profiler.trace`, the trace's device plane is read back with
`jax.profiler.ProfileData`, and the device events are summed per kernel (the HLO op's name when
the event has one, else the kernel name), per call.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import tempfile

import jax


@dataclasses.dataclass(frozen=True)
class KernelTime:
  name: str
  launches: float  # per call
  ms: float  # device time per call


def traced_calls(fn, args, reps: int, options=None) -> list:
  """The `jax.profiler.ProfileData` of a trace of `reps` waited calls of fn(*args) (one per
  .xplane.pb written; fn already compiled). options: a `jax.profiler.ProfileOptions` or None."""
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, profiler_options=options):
      for _ in range(reps):
        jax.block_until_ready(fn(*args))
    paths = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
    if not paths:
      raise RuntimeError(f"jax.profiler.trace wrote no .xplane.pb under {d}")
    return [jax.profiler.ProfileData.from_file(p) for p in paths]


def device_events(data):
  """(name, start_ns, duration_ns) of every event on a ProfileData's GPU planes' stream lines."""
  for plane in data.planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      if not line.name.startswith("Stream"):
        continue
      for ev in line.events:
        stats = dict(ev.stats)
        yield str(stats.get("hlo_op") or ev.name), float(ev.start_ns), float(ev.duration_ns)


def kernel_times(fn, args, reps: int = 3) -> tuple[list[KernelTime], float, float]:
  """(per-kernel times sorted by device ms, total busy ms per call, device span ms per call) of
  `fn(*args)` (already compiled: call it once before). The span runs from the first kernel's start
  to the last one's end over all reps, divided by reps (it includes gaps between kernels)."""
  jax.block_until_ready(fn(*args))
  events = [e for dat in traced_calls(fn, args, reps) for e in device_events(dat)]
  if not events:
    raise RuntimeError("the trace has no GPU stream events (is this a GPU backend?)")
  count, total = collections.Counter(), collections.Counter()
  for name, _, dur in events:
    count[name] += 1
    total[name] += dur
  rows = sorted((KernelTime(n, count[n] / reps, total[n] / reps / 1e6) for n in count),
                key=lambda r: -r.ms)
  span = (max(s + d for _, s, d in events) - min(s for _, s, _ in events)) / reps / 1e6
  return rows, sum(r.ms for r in rows), span


def report(title: str, fn, args, reps: int = 3, top: int = 12) -> None:
  """Prints `kernel_times` of fn(*args): the `top` kernels, busy and span per call."""
  rows, busy, span = kernel_times(fn, args, reps)
  print(f"{title}: device busy {busy:.3f} ms/call, span {span:.3f} ms/call, "
        f"{sum(r.launches for r in rows):.0f} events/call", flush=True)
  for r in rows[:top]:
    print(f"  {r.ms:9.3f} ms  {r.launches:6.0f} x  {r.name[:90]}", flush=True)
