"""Shared by the TTT kernel benchmarks: layer-shaped random inputs, relative error, wall times."""

from __future__ import annotations

import json
import statistics
import time

import jax
import numpy as np

# (the kernel files' mains share these: kept in pallas_kernels, re-exported here)
from pallas_kernels.kernel_bench import layer_target, median_ms, rel, ttt_inputs  # noqa: F401


def select_heads(args: tuple, cot, head_ids: str):
  """`ttt_inputs`-style inputs and their cotangent restricted to the comma-listed heads (heads
  are independent): arrays [B, H, ...] (4-d and up) and [H, ...]; unchanged for ""."""
  if not head_ids:
    return args, cot
  ids = np.array([int(x) for x in head_ids.split(",")])
  return tuple(x[:, ids] if x.ndim >= 4 else x[ids] for x in args), cot[:, ids]


def per_head_rel(a, b) -> np.ndarray:
  """Relative L2 difference of a against b per head: [B, H, ...] -> [H] (float64)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  axes = (0,) + tuple(range(2, a.ndim))
  return np.sqrt(((a - b) ** 2).sum(axes) / (b ** 2).sum(axes))


def in_flight_ms(fn, args, n: int, reps: int) -> float:
  """Median over `reps` of (wall ms of n calls dispatched back to back, waited once) / n: the
  per-call cost when the host's work per call overlaps the previous call's kernels, as in a model
  that runs many layers (`benchmarks/launch_overhead.py`)."""
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready([fn(*args) for _ in range(n)])
    ts.append((time.perf_counter() - t) * 1e3 / n)
  return statistics.median(ts)


def summarize(rows: list[dict], out: str = "") -> None:
  """Prints the kernel benchmarks' closing table (one line per row) and writes rows to `out` (JSON)."""
  nan = float("nan")
  print("\neta    NC    impl            fwd_ms  TFLOP/s  fwd+bwd_ms  out_rel  max_grad_rel"
        "  (in flight: fwd_ms fwd+bwd_ms)")
  for r in rows:
    mg = max(r["grad_rel"].values()) if "grad_rel" in r else nan  # nan if any is nan
    print(f"{r['eta_scale']:.0e} {r['NC']:5d} {r['impl']:14s} {r.get('fwd_ms', nan):8.2f} "
          f"{r.get('fwd_tflops', nan):8.3f} {r.get('fwdbwd_ms', nan):10.1f} "
          f"{r['out_rel']:.2e} {mg:.2e}  {r.get('fwd_ms_in_flight', nan):8.2f} "
          f"{r.get('fwdbwd_ms_in_flight', nan):10.1f}")
  if out:
    with open(out, "w") as fh:
      json.dump(rows, fh, indent=1)
