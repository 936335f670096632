"""Timing attribution for the TTT-MLP Pallas backward (`backward="pallas"`), one H100.

Per checkpoint group (B=1, H=48, G=16, NC=282 inputs): the forward kernel restarted with a
checkpoint every mini-batch, the backward kernel (full and with phases removed: WRONG results, for
attribution only), and the whole backward (the custom_vjp's bwd, jitted) at NC=282.
`restart_outputs`: the restart with and without its query half. `ab NAME A,B [NC,...]`: A/B of a
`ttt_mlp` module constant or of `backward=` (forward and whole backward timed interleaved).
`trace [NC,...] [backward]`: per-kernel device time of the forward and the whole backward (`device_trace`),
with the default one group per launch and with every group in one launch (BWD_LAUNCH_BYTES).
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp

from benchmarks import device_trace
from benchmarks.kernel_common import rel
from benchmarks.ttt_mlp_kernel import make_inputs, median_ms
from pallas_kernels.ttt_mlp import kernel_bwd_mgpu
from pallas_kernels.ttt_mlp import ttt_mlp as T


VARIANTS = (("full", ""), ("no exchange", "X"), ("no recompute mm", "R"),
            ("no update reverse", "U"), ("no R, no U", "RU"), ("no R/U/X", "RUX"))


def group_setup(H: int, NC: int, G: int):
  """One checkpoint group's kernel inputs at B=1: bf16 q, k, v [H, G+1, 64, 64], eta [H, G+1, 64],
  output cotangent do [H, G, 64, 64], LN weight/bias per head, the forward checkpoints, and the jitted
  forward kernel over G + 1 steps with a checkpoint every step (the restart the backward runs)."""
  args = make_inputs(jax.random.PRNGKey(0), 1, H, NC)
  _, ck = jax.jit(functools.partial(T._forward_raw, group=G, ln_eps=1e-6, interpret=False))(*args)
  bf = lambda a: a.astype(jnp.bfloat16).reshape(H, NC, 64, 64)[:, :G + 1]
  q, k, v = bf(args[0]), bf(args[1]), bf(args[2])
  e = args[3].reshape(H, NC, 64)[:, :G + 1]
  do = jax.random.normal(jax.random.PRNGKey(1), (H, G, 64, 64)).astype(jnp.bfloat16)
  gam, bet = T._per_head(args[4], 1), T._per_head(args[5], 1)
  fwd = jax.jit(T._build(H, G + 1, 1, 1e-6, False, "v3"))
  return q, k, v, e, do, gam, bet, ck, fwd


def main(H=48, NC=282, G=16, reps=5, variants="full,no update reverse,no R, no U"):
  print("device:", jax.devices()[0].device_kind, flush=True)
  q, k, v, e, do, gam, bet, ck, fwd = group_setup(H, NC, G)
  fargs = (q, k, v, e, gam, bet) + tuple(a[:, 0] for a in ck)
  t = median_ms(fwd, fargs, reps)
  print(f"forward restart, {G + 1} steps, ckpt every step: {t:8.3f} ms  {t * 1e3 / (G + 1):7.2f} "
        "us/step", flush=True)
  t = median_ms(jax.jit(T._build(H, G + 1, 10**6, 1e-6, False, "v3")), fargs, reps)
  print(f"forward,         {G + 1} steps, no ckpt:         {t:8.3f} ms  {t * 1e3 / (G + 1):7.2f} "
        "us/step", flush=True)
  _, sw1, _, sb1, sw2, _, sb2 = fwd(*fargs)
  z = lambda *s: 1e-3 * jnp.ones(s, jnp.float32)
  bargs = (q, k, v, e, do, gam, bet, sw1, sb1, sw2, sb2, z(H, 4, 64, 64), z(H, 4, 64),
           z(H, 4, 64, 64), z(H, 64))
  for name, abl in VARIANTS:
    if name not in variants and variants != "all":
      continue
    fn = jax.jit(kernel_bwd_mgpu.build_backward(H, G, 1e-6, ablate=frozenset(abl)))
    t = median_ms(fn, bargs, reps)
    print(f"backward kernel {name:20s}: {t:8.3f} ms  {t * 1e3 / G:7.2f} us/step", flush=True)
  args = make_inputs(jax.random.PRNGKey(0), 1, H, NC)
  f = lambda *a: T.ttt_mlp_pallas(*a, checkpoint_group_size=G, backward="pallas")
  out, vjp = jax.vjp(f, *args)
  cot = jax.random.normal(jax.random.PRNGKey(2), out.shape, jnp.float32).astype(out.dtype)
  t = median_ms(jax.jit(vjp), (cot,), reps)
  print(f"whole backward (custom_vjp bwd) NC={NC}: {t:8.3f} ms", flush=True)


def restart_outputs(H=48, NCs=(282, 1000), G=16, reps=7):
  """The backward's restart with and without its query half (`AccTuningConfig(outputs=...)`):
  the restart kernel alone (states must be bitwise equal) and the whole backward, interleaved."""
  print("device:", jax.devices()[0].device_kind, flush=True)
  q, k, v, e, _, gam, bet, ck, _ = group_setup(H, NCs[0], G)
  fargs = (q, k, v, e, gam, bet) + tuple(a[:, 0] for a in ck)
  fns = {o: jax.jit(T._build(H, G + 1, 1, 1e-6, False, "v3", outputs=o)) for o in (True, False)}
  same = all(bool(jnp.array_equal(a, b)) for a, b in zip(fns[True](*fargs)[1:], fns[False](*fargs)[1:]))
  print(f"restart states bitwise equal with/without outputs: {same}", flush=True)
  for _ in range(2):
    for o, fn in fns.items():
      t = median_ms(fn, fargs, reps)
      print(f"restart outputs={o!s:5s}: {t:8.3f} ms  {t * 1e3 / (G + 1):7.2f} us/step", flush=True)
  default = T.RESTART_OUTPUTS
  for i, NC in enumerate(NCs):
    args = make_inputs(jax.random.PRNGKey(1000 + i), 1, H, NC)
    vjps = {}
    for o in (True, False):
      T.RESTART_OUTPUTS = o
      f = lambda *a: T.ttt_mlp_pallas(*a, checkpoint_group_size=G)
      out, vjp = jax.vjp(f, *args)
      cot = jax.random.normal(jax.random.PRNGKey(2), out.shape, jnp.float32).astype(out.dtype)
      vjps[o] = jax.jit(vjp)
      jax.block_until_ready(vjps[o](cot))  # traced (and compiled) with this setting
    T.RESTART_OUTPUTS = default
    for _ in range(2):
      for o, fn in vjps.items():
        print(f"NC={NC} whole backward, restart outputs={o!s:5s}: {median_ms(fn, (cot,), reps):8.3f} ms",
              flush=True)


def ab_constant(name: str, values: tuple, H=48, NCs=(282, 1000), G=16, reps=5):
  """A/B of a module constant of `pallas_kernels.ttt_mlp.ttt_mlp` (e.g. BWD_LAUNCH_BYTES,
  REDUCTION_SCRATCH), or of `ttt_mlp_pallas(backward=...)` when name == "backward": per NC the jitted forward and the whole backward (custom_vjp bwd) traced
  with each value, timed interleaved (2 rounds), and the max rel difference of outputs and the 10
  gradients against the first value."""
  print("device:", jax.devices()[0].device_kind, flush=True)
  default = getattr(T, name) if name != "backward" else None
  for i, NC in enumerate(NCs):
    args = make_inputs(jax.random.PRNGKey(1000 + i), 1, H, NC)
    cot = None
    fwds, bwds, res = {}, {}, {}
    for v in values:
      if name == "backward":  # name = "backward": values are `ttt_mlp_pallas(backward=...)` names
        fwds[v] = jax.jit(functools.partial(T.ttt_mlp_pallas, checkpoint_group_size=G, backward=v))
      else:
        setattr(T, name, v)
        fwds[v] = jax.jit(functools.partial(T.ttt_mlp_pallas, checkpoint_group_size=G))
      out, vjp = jax.vjp(fwds[v], *args)
      if cot is None:
        cot = jax.random.normal(jax.random.PRNGKey(2), out.shape, jnp.float32).astype(out.dtype)
      bwds[v] = jax.jit(vjp)
      res[v] = (out,) + tuple(jax.block_until_ready(bwds[v](cot)))  # traced with this value
    if name != "backward":
      setattr(T, name, default)
    ref = res[values[0]]
    for v in values[1:]:
      print(f"NC={NC} {name}={v}: max rel diff vs {values[0]} (out, 10 grads) "
            f"{max(rel(a, b) for a, b in zip(res[v], ref)):.2e}", flush=True)
    for _ in range(2):
      for v in values:
        print(f"NC={NC} {name}={v!s:>12s}: forward {median_ms(fwds[v], args, reps):8.3f} ms, "
              f"whole backward {median_ms(bwds[v], (cot,), reps):8.3f} ms", flush=True)


def trace(H=48, NCs=(282, 1000), G=16, reps=3, backward="pallas_qpass",
          budgets=(None, 8 << 30), forward=True):
  """Where the whole backward's device time goes: per-kernel times from a profiler trace (per NC:
  the forward, then the whole backward with each BWD_LAUNCH_BYTES of `budgets`, None: default)."""
  print("device:", jax.devices()[0].device_kind, flush=True)
  default = T.BWD_LAUNCH_BYTES
  for i, NC in enumerate(NCs):
    args = make_inputs(jax.random.PRNGKey(1000 + i), 1, H, NC)
    fwd = jax.jit(functools.partial(T.ttt_mlp_pallas, checkpoint_group_size=G))
    if forward:
      device_trace.report(f"NC={NC} forward", fwd, args, reps)
    for budget in (default if b is None else b for b in budgets):
      T.BWD_LAUNCH_BYTES = budget
      S, L = T.groups_per_launch(-(-NC // G), H, G, step_bytes=T._RESTART_STEP_BYTES + (
          T._QPASS_STEP_BYTES if backward == "pallas_qpass" else T._SAVED_STEP_BYTES),
          budget=budget)
      f = jax.jit(lambda *a: T.ttt_mlp_pallas(*a, checkpoint_group_size=G,  # a fresh trace
                                              backward=backward))
      out, vjp = jax.vjp(f, *args)
      cot = jax.random.normal(jax.random.PRNGKey(2), out.shape, jnp.float32).astype(out.dtype)
      bwd = jax.jit(vjp)
      jax.block_until_ready(bwd(cot))  # traced with this budget
      T.BWD_LAUNCH_BYTES = default
      device_trace.report(f"NC={NC} whole backward ({backward}), {S} groups x {L} launches", bwd,
                          (cot,), reps)
      print(f"NC={NC} whole backward wall median {median_ms(bwd, (cot,), 5):8.3f} ms", flush=True)


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "trace":  # trace [NC,...] [backward]
    sys.exit(trace(**({"NCs": tuple(int(x) for x in sys.argv[2].split(","))}
                      if len(sys.argv) > 2 else {}),
                   **({"backward": sys.argv[3]} if len(sys.argv) > 3 else {})))
  if len(sys.argv) > 2 and sys.argv[1] == "ab":  # ab NAME v1,v2[,...] [NC,...]
    conv = str if sys.argv[2] == "backward" else int
    sys.exit(ab_constant(sys.argv[2], tuple(conv(x) for x in sys.argv[3].split(",")),
                         **({"NCs": tuple(int(x) for x in sys.argv[4].split(","))}
                            if len(sys.argv) > 4 else {})))
  if len(sys.argv) > 1 and sys.argv[1] == "restart_outputs":
    sys.exit(restart_outputs())
  sys.exit(main(**({"variants": sys.argv[1]} if len(sys.argv) > 1 else {})))
