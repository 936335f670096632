"""What the kernel files' `main()`s share: flags, layer-shaped inputs, timing, one report line.

Every kernel module runs as a script (`python -m pallas_kernels.ttt_mlp.kernel_ws_mgpu`): it
times its kernel against the pure-jnp / XLA reference beside it at the real shapes (B=1, H=48,
NC=282 unless told) on this device, or with --interpret in Mosaic GPU interpret mode on the CPU
at small shapes, and prints one line per variant: kernel ms, reference ms, largest relative
difference. `benchmarks/` holds the full sweeps; these are the one-command checks.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from typing import Callable, Sequence

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


def wait_polling(out) -> None:
  """Waits for every array of `out` by spinning on `is_ready()`: the host thread never sleeps,
  so its wake-up is not part of the time, as it is for a blocking wait (H100: no faster in
  practice; PjRt's completion path is the cost: benchmarks/NOTES-ttt-mlp.md)."""
  leaves = jax.tree.leaves(out)
  while not all(x.is_ready() for x in leaves):
    pass


def median_ms(fn, args, reps: int, wait: str = "block") -> float:
  """Median wall ms of fn(*args) over `reps` calls after one compile + warm-up call; each call
  waited by `jax.block_until_ready` (wait="block") or by `wait_polling` ("poll")."""
  if wait not in ("block", "poll"):
    raise ValueError(f"wait must be 'block' or 'poll', got {wait!r}")
  done = jax.block_until_ready if wait == "block" else wait_polling
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    done(fn(*args))
    ts.append((time.perf_counter() - t) * 1e3)
  return statistics.median(ts)


def parse_flags(argv: Sequence[str] | None, doc: str, variants: Sequence[str],
                default_variants: Sequence[str] | None = None, **extra) -> argparse.Namespace:
  """The kernel mains' flags: --heads, --nc, --group, --reps, --eta_scale, --variants, --interpret
  (CPU: Mosaic GPU interpret mode; heads 1, nc 3 unless given), plus `extra` name=default ints."""
  p = argparse.ArgumentParser(description=doc)
  p.add_argument("--heads", type=int, default=None, help="B=1 heads (default 48; 1 interpreted)")
  p.add_argument("--nc", type=int, default=None, help="mini-batches (default 282; 3 interpreted)")
  p.add_argument("--group", type=int, default=16, help="checkpoint group size")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--eta_scale", type=float, default=1e-5)
  p.add_argument("--variants", default=",".join(default_variants or variants),
                 help=f"comma-separated, of {', '.join(variants)}")
  p.add_argument("--interpret", action="store_true", help="CPU: Mosaic GPU interpret mode")
  for name, default in extra.items():
    p.add_argument(f"--{name}", type=int, default=default)
  a = p.parse_args(argv)
  a.heads = a.heads or (1 if a.interpret else 48)
  a.nc = a.nc or (3 if a.interpret else 282)
  a.variants = [v for v in a.variants.split(",") if v]
  unknown = [v for v in a.variants if v not in variants]
  if unknown:
    p.error(f"unknown variants {unknown}; this kernel has {list(variants)}")
  return a


def interpret_params(a: argparse.Namespace):
  """Mosaic GPU interpret parameters for --interpret, else None (compiled)."""
  return jax.experimental.pallas.mosaic_gpu.InterpretGPUParams() if a.interpret else None


def report(name: str, kernel: Callable, kargs: tuple, reference: Callable, rargs: tuple,
           reps: int) -> float:
  """Times jitted `kernel(*kargs)` and `reference(*rargs)` and prints one line with the largest
  relative difference over their results (pytrees of the same structure); returns it."""
  kernel, reference = jax.jit(kernel), jax.jit(reference)
  diff = max(rel(x, y) for x, y in zip(jax.tree.leaves(kernel(*kargs)),
                                       jax.tree.leaves(reference(*rargs))))
  print(f"{name}: device {jax.devices()[0].device_kind}; kernel {median_ms(kernel, kargs, reps):.3f}"
        f" ms, reference {median_ms(reference, rargs, reps):.3f} ms, max rel diff {diff:.2e}",
        flush=True)
  return diff


def _f32(xs):
  return tuple(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x for x in xs)


_NAMES = {"mlp": "TTT-MLP", "linear": "TTT-Linear"}


def _layer(name: str):
  """(hidden of the state, the kernel wrapper's raw forward, its custom_vjp function, the XLA
  scan) of "mlp" or "linear"."""
  from ttt_dit.ttt import inner_loop
  if name == "mlp":
    from pallas_kernels.ttt_mlp import ttt_mlp as T
    return 256, T._forward_raw, T.ttt_mlp_pallas, inner_loop.ttt_mlp  # noqa: SLF001
  if name == "linear":
    from pallas_kernels.ttt_linear import ttt_linear as L
    return None, L._forward_raw, L.ttt_linear_pallas, inner_loop.ttt_linear  # noqa: SLF001
  raise ValueError(f"layer must be 'mlp' or 'linear', got {name!r}")


def forward_main(argv, doc: str, variants: Sequence[str], default_variants=None, *,
                 layer: str = "mlp") -> dict[str, float]:
  """main() of a forward kernel file: each variant's kernel (through the wrapper's layout
  conversion) vs the float32 XLA scan (`ttt_dit.ttt.inner_loop`); {variant: max rel difference
  of out - Q}."""
  hidden, raw, _, scan = _layer(layer)
  a = parse_flags(argv, doc, variants, default_variants)
  args = ttt_inputs(jax.random.PRNGKey(0), 1, a.heads, a.nc, hidden=hidden, eta_scale=a.eta_scale)
  ref = lambda *x: scan(*x, checkpoint_group_size=a.group) - x[0]
  diffs = {}
  for v in a.variants:
    raw_v = functools.partial(raw, group=a.group, ln_eps=1e-6, interpret=a.interpret, variant=v)
    kern = lambda *x, f=raw_v: f(*x)[0].astype(jnp.float32) - x[0].astype(jnp.float32)
    diffs[v] = report(f"{_NAMES[layer]} forward {v}, H={a.heads}, NC={a.nc}", kern, args, ref,
                      _f32(args), a.reps)
  return diffs


def backward_main(argv, doc: str, variants: Sequence[str], default_variants=None, *,
                  layer: str = "mlp") -> dict[str, float]:
  """main() of a backward kernel file: forward + backward (the ten / eight input gradients) of
  the kernel wrapper with each `backward=` choice vs `jax.grad` of the float32 XLA scan;
  {choice: max rel difference over the gradients}."""
  hidden, _, wrapper, scan = _layer(layer)
  a = parse_flags(argv, doc, variants, default_variants)
  args = ttt_inputs(jax.random.PRNGKey(0), 1, a.heads, a.nc, hidden=hidden, eta_scale=a.eta_scale)
  cot = jax.random.normal(jax.random.PRNGKey(1), args[0].shape, jnp.float32)
  cot = cot.astype(jnp.bfloat16).astype(jnp.float32)  # bf16-valued: what a bf16 output's VJP gets
  grads = lambda f: jax.grad(lambda *x: jnp.sum(f(*x).astype(jnp.float32) * cot),
                             argnums=tuple(range(len(args))))
  ref = grads(functools.partial(scan, checkpoint_group_size=a.group))
  diffs = {}
  for v in a.variants:
    f = functools.partial(wrapper, checkpoint_group_size=a.group, interpret=a.interpret,
                          backward=v)
    diffs[v] = report(f"{_NAMES[layer]} forward + backward={v}, H={a.heads}, NC={a.nc}",
                      grads(f), args, ref, _f32(args), a.reps)
  return diffs
