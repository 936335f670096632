"""Shared by the TTT kernel benchmarks: layer-shaped random inputs, relative error, median wall time."""

from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp


def layer_target(V: jax.Array, K: jax.Array, ln_w: jax.Array, ln_b: jax.Array) -> jax.Array:
  """The layer's reconstruction target (spec §3.2.4): gamma (D - mean) / (std_unbiased + 1e-8) + beta
  + K with D = V - K, per token and head. V, K [B, H, NC, CS, F] float32; ln_w, ln_b [H, F]."""
  d = V - K
  mu = jnp.mean(d, axis=-1, keepdims=True)
  sd = jnp.std(d, axis=-1, keepdims=True, ddof=1)
  g, b = ln_w[None, :, None, None], ln_b[None, :, None, None]  # [1, H, 1, 1, F]
  return g * (d - mu) / (sd + 1e-8) + b + K


def ttt_inputs(key, B: int, H: int, NC: int, *, hidden: int | None, CS: int = 64, F: int = 64,
               eta_scale: float = 1e-5, target: str = "unit") -> tuple:
  """Random inputs shaped as the TTT layer makes them (bf16 Q/K/V, L2-normalised Q/K, eta ~ eta_scale).

  hidden=None: TTT-Linear state (W1 [H, F, F], b1 [H, 1, F]); else TTT-MLP state (W1 [H, F, hidden],
  b1 [H, 1, hidden], W2 [H, hidden, F], b2 [H, 1, F]). Returns (XQ, XK, XV, eta, ln_w, ln_b, *state).
  target: "unit" (V-target random unit rows, independent of K) or "layer" (V ~ N(0, 1), the target
  built from V and K as the layer builds it: `layer_target`, rows of norm ~8).
  """
  if target not in ("unit", "layer"):
    raise ValueError(f"target must be 'unit' or 'layer', got {target!r}")
  ks = jax.random.split(key, 10)
  n = lambda k, s: jax.random.normal(k, s, jnp.float32)
  l2 = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  XQ, XK = (l2(n(k, (B, H, NC, CS, F))) for k in ks[:2])  # [B, H, NC, CS, F]
  lw, lb = 1.0 + 0.1 * n(ks[4], (H, F)), 0.1 * n(ks[5], (H, F))
  XV = l2(n(ks[2], XK.shape)) if target == "unit" else layer_target(n(ks[2], XK.shape), XK, lw, lb)
  XQ, XK, XV = (x.astype(jnp.bfloat16) for x in (XQ, XK, XV))
  eta = eta_scale * jax.random.uniform(ks[3], (B, H, NC, CS), minval=0.5, maxval=1.5)  # [B, H, NC, CS]
  if hidden is None:
    return (XQ, XK, XV, eta, lw, lb, 0.02 * n(ks[6], (H, F, F)), jnp.zeros((H, 1, F)))
  return (XQ, XK, XV, eta, lw, lb, 0.02 * n(ks[6], (H, F, hidden)), jnp.zeros((H, 1, hidden)),
          0.02 * n(ks[7], (H, hidden, F)), jnp.zeros((H, 1, F)))


def rel(a, b) -> float:
  """Relative L2 error of a against b (float32)."""
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


def median_ms(fn, args, reps: int) -> float:
  """Median wall ms of fn(*args) over `reps` calls after one compile + warm-up call."""
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append((time.perf_counter() - t) * 1e3)
  return statistics.median(ts)


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
