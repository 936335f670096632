"""How much of a TTT kernel call's wall time is the kernel: one call vs calls in flight vs one program.

`ttt_mlp_kernel` times one jitted call at a time (dispatch, kernel, wait). That includes a host
cost per call that a model, which runs many TTT layers in one jitted program, may or may not pay.
Per NC this prints, for the TTT-MLP forward (and forward + backward) with the defaults:
- `single`: median wall ms of one call, waited (what `ttt_mlp_kernel` reports);
- `in_flight`: N calls dispatched back to back, waited once, divided by N (host work overlaps);
- `program`: one jitted program chaining N calls (each call's output feeds the next call's
  queries), divided by N: what a layer stack sees;
- `busy`: the kernels' device time per call from a profiler trace (`device_trace`).
Run with `XLA_FLAGS=--xla_gpu_enable_command_buffer=` to see the cost without CUDA graphs.

  python -m benchmarks.launch_overhead [--nc 282,1000] [--n 8] [--reps 5] [--no_grad]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import jax
import jax.numpy as jnp

from benchmarks import device_trace
from benchmarks.kernel_common import in_flight_ms, median_ms
from benchmarks.ttt_mlp_kernel import make_inputs
from pallas_kernels.ttt_mlp import ttt_mlp_pallas


def chained(step, n: int):
  """A jitted program running `step(q, *rest) -> q` n times in a row (a fori_loop)."""
  @jax.jit
  def run(q, *rest):
    return jax.lax.fori_loop(0, n, lambda _, q: step(q, *rest), q)
  return run


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--nc", default="282,1000")
  p.add_argument("--heads", type=int, default=48)
  p.add_argument("--n", type=int, default=8, help="calls in flight / chained in one program")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--group", type=int, default=16)
  p.add_argument("--no_grad", action="store_true", help="forward only")
  a = p.parse_args(argv)
  print("device:", jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
  tiny = jnp.zeros((8,), jnp.float32)  # the floor: one trivial jitted call, waited
  print(json.dumps({"what": "x + 1", "single": median_ms(jax.jit(lambda x: x + 1), (tiny,), 50)}))
  f = functools.partial(ttt_mlp_pallas, checkpoint_group_size=a.group)
  for i, NC in enumerate(int(x) for x in a.nc.split(",")):
    args = make_inputs(jax.random.PRNGKey(1000 + i), 1, a.heads, NC)
    cot = jax.random.normal(jax.random.PRNGKey(7), args[0].shape, jnp.float32)

    def fwdbwd(*x):  # forward + backward: the gradients of all ten inputs (none left to DCE)
      return jax.grad(lambda *y: jnp.sum(f(*y).astype(jnp.float32) * cot),
                      argnums=tuple(range(len(x))))(*x)

    def fwdbwd_step(q, *r):  # 1e-30 of every gradient's sum: the chain's dependency, nothing more
      s = sum(jnp.sum(g.astype(jnp.float32)) for g in fwdbwd(q, *r))
      return (q + 1e-30 * s).astype(q.dtype)

    cases = {"forward": (f, lambda q, *r: f(q, *r))}
    if not a.no_grad:
      cases["fwd+bwd"] = (fwdbwd, fwdbwd_step)
    for name, (fn, step) in cases.items():
      fn = jax.jit(fn)
      row = dict(NC=NC, what=name, n=a.n,
                 single=median_ms(fn, args, a.reps),
                 in_flight=in_flight_ms(fn, args, a.n, a.reps),
                 program=median_ms(chained(step, a.n), args, a.reps) / a.n)
      _, busy, span = device_trace.kernel_times(fn, args, a.reps)
      row.update(busy=busy, span=span)
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  sys.exit(main())
