"""Shared by the TTT kernel benchmarks: layer-shaped random inputs, relative error, wall times."""

from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
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


def reference_sensitivity(grad_fn, args: tuple, cot, gref: tuple, names: tuple, size: float,
                          conditioned_below: float) -> tuple[np.ndarray, dict]:
  """The float32 reference against itself: its gradients with W1 (args[6]) scaled by (1 + size)
  vs `gref` (one float32 ulp: size 1.2e-7). Returns (the heads whose XK gradient moves less than
  `conditioned_below`, a JSON-able report: the max per gradient, XK per head median/max, the
  6 most sensitive heads). grad_fn(args, cot) -> (loss, grads) as the benchmarks' loss_fn."""
  pert = list(args)
  pert[6] = pert[6] * (1 + size)
  gpert = grad_fn(tuple(pert), cot)[1]
  sens = per_head_rel(gpert[1], gref[1])  # [H], XK as the per-head errors
  cond = np.nonzero(sens < conditioned_below)[0]
  report = {"ref_grad_sensitivity": size,
            "max": {k: rel(x, y) for k, x, y in zip(names, gpert, gref)},
            "xk_per_head_median": float(np.median(sens)), "xk_per_head_max": float(sens.max()),
            "argmax": int(sens.argmax()), "conditioned_heads": len(cond),
            "worst_heads": {int(h): float(sens[h]) for h in np.argsort(sens)[::-1][:6]}}
  return cond, report


def rel_on_heads(x, y, heads, name: str) -> float:
  """rel(x, y) over the given heads only: axis 1 for the per-token inputs ([B, H, ...]), else 0."""
  axis = 1 if name in ("XQ", "XK", "XV", "eta") else 0
  return rel(jnp.take(x, heads, axis=axis), jnp.take(y, heads, axis=axis))


def add_reference_flags(p) -> None:
  """The kernel benchmarks' flags for their inputs' seed and the reference's self-check."""
  p.add_argument("--seed", type=int, default=1000,
                 help="inputs of the i-th NC from PRNGKey(seed + i) (1000: the recorded figures)")
  p.add_argument("--grad_sensitivity", type=float, default=0.0,
                 help="also the float32 reference's gradients with W1 scaled by (1 + this), e.g. "
                      "1.2e-7 (one float32 ulp): the reference's own uncertainty per head")
  p.add_argument("--conditioned_below", type=float, default=1e-4,
                 help="with --grad_sensitivity: heads whose reference XK gradient moves less than "
                      "this are 'conditioned'; errors are also reported over those heads alone")
  p.add_argument("--ref_repeat", action="store_true",
                 help="also the float32 reference's gradients computed a second time on the same "
                      "inputs (a 'ref_grad_sensitivity': 0 report): is the device's scan deterministic?")


def conditioned_errors(g: tuple, gref: tuple, cond, names: tuple) -> dict:
  """A benchmark row's fields for the conditioned heads (`reference_sensitivity`; none if cond is
  None): their count and, when there are any, each gradient's rel L2 error over them alone."""
  if cond is None:
    return {}
  out = {"conditioned_heads": len(cond)}
  if len(cond):
    out["grad_rel_conditioned"] = {k: rel_on_heads(x, y, cond, k) for k, x, y in zip(names, g, gref)}
  return out

