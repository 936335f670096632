"""Where does a TTT-MLP kernel's gradient error come from: its forward trajectory or its backward? (GPU)

    python -m benchmarks.ttt_mlp_bisect --nc 282 --variants v7pe,v3_3pass \
        --backwards xla_vjp,pallas,pallas_qpass [--exact_math] [--heads_of_interest 11,47,27]

On `benchmarks.ttt_mlp_kernel`'s inputs for that NC (key 1000 + --position, cotangent
PRNGKey(7 + --position), bf16-valued as the kernels' bf16 output receives it):
1. trajectory: each forward variant's checkpoints (hi + lo) against the float32 XLA scan's states at
   the same group starts (rounded to (hi, lo) pairs), as the relative L2 error of the state's
   change since mini-batch 0, per head (W1 and W2);
2. gradients: `ttt_mlp_pallas(variant, backward)` for every pair, the ten gradients vs `jax.grad`
   of the float32 scan (max), and XK per head (median, max, the heads of interest).
`backward="xla_vjp"` restarts the float32 XLA scan from the kernel's checkpoints, so its error is
the trajectory's; the kernel backwards add their own. --exact_math builds every kernel without
tanh.approx / rsqrt.approx (`mgpu_common.exact_math`). Runs on the CPU with --interpret (small
shapes, cluster 1). Not a test; a tool for NOTES-ttt-mlp.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernel_common import per_head_rel, rel, select_heads
from benchmarks.ttt_mlp_kernel import make_inputs
from pallas_kernels import mgpu_common
from pallas_kernels.ttt_mlp import ttt_mlp as T
from ttt_dit.ttt import inner_loop

NAMES = ("XQ", "XK", "XV", "eta", "ln_w", "ln_b", "W1", "b1", "W2", "b2")


def scan_states(args, group: int, ln_eps: float):
  """The float32 XLA scan's state (W1, W2) before every `group`-th mini-batch: [NG, B, H, ...]."""
  XQ, XK, XV, eta, lw, lb, W1, b1, W2, b2 = (a.astype(jnp.float32) for a in args)
  B = XQ.shape[0]
  state = tuple(jnp.broadcast_to(s, (B,) + s.shape) for s in (W1, b1, W2, b2))
  mv = lambda a: jnp.moveaxis(a, 2, 0)  # [B, H, NC, ...] -> [NC, B, H, ...]

  def body(s, xs):
    q, k, v, e = xs
    s_new, _ = inner_loop._mlp_step(s, (q, k, v, e, lw[:, None], lb[:, None]),  # noqa: SLF001
                                    ln_eps=ln_eps, diagnostics=False)
    return s_new, (s[0], s[2])
  _, (w1s, w2s) = jax.lax.scan(body, state, (mv(XQ), mv(XK), mv(XV), mv(eta)))
  return w1s[::group], w2s[::group]


def as_pairs(x):
  """x rounded to a bf16 (hi, lo) pair, as the kernels store checkpoints (~16 significant bits)."""
  hi, lo = mgpu_common.split_bf16(x)
  return hi.astype(jnp.float32) + lo.astype(jnp.float32)


def trajectory_errors(ck, ref) -> np.ndarray:
  """Per head relative L2 error of the state's change since mini-batch 0, against the reference
  rounded to (hi, lo) pairs as the checkpoints are, so that the pairs' own rounding is not counted:
  ck, ref [NG, B, H, ...] -> [H]."""
  ref = np.asarray(as_pairs(ref), np.float64)
  d = lambda x: np.asarray(x, np.float64)[1:] - ref[0][None]
  a, b = d(ck), d(ref)
  axes = (0, 1) + tuple(range(3, a.ndim))
  return np.sqrt(((a - b) ** 2).sum(axes) / (b ** 2).sum(axes))


def head_summary(err: np.ndarray, heads) -> dict:
  """median / max / argmax of a per-head error, and its value at `heads`."""
  return dict(median=float(np.median(err)), max=float(err.max()), argmax=int(err.argmax()),
              **{f"head{h}": float(err[h]) for h in heads if h < err.size})


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--nc", type=int, default=282)
  p.add_argument("--heads", type=int, default=48)
  p.add_argument("--position", type=int, default=0,
                 help="the NC's position in ttt_mlp_kernel's --nc list (its input key offset)")
  p.add_argument("--group", type=int, default=16)
  p.add_argument("--eta_scale", type=float, default=1e-5)
  p.add_argument("--variants", default="v7pe,v3_3pass")
  p.add_argument("--backwards", default="xla_vjp,pallas,pallas_qpass")
  p.add_argument("--heads_of_interest", default="11,47,27")
  p.add_argument("--exact_math", action="store_true")
  p.add_argument("--interpret", action="store_true", help="CPU: Mosaic GPU interpret mode")
  p.add_argument("--head_ids", default="",
                 help="comma list: only these heads of the --heads inputs (heads are independent)")
  p.add_argument("--cpu_ref", action="store_true",
                 help="also the float32 reference computed on the host CPU: its difference from "
                      "the device's, and the kernels' errors against it")
  a = p.parse_args(argv)
  G, eps = a.group, 1e-6
  heads = [int(h) for h in a.heads_of_interest.split(",") if h]
  args = make_inputs(jax.random.PRNGKey(1000 + a.position), 1, a.heads, a.nc,
                     eta_scale=a.eta_scale)
  cot = jax.random.normal(jax.random.PRNGKey(7 + a.position), args[0].shape, jnp.float32)
  cot = cot.astype(jnp.bfloat16).astype(jnp.float32)
  args, cot = select_heads(args, cot, a.head_ids)
  if a.head_ids:  # the heads of interest are then the listed ones, in order
    heads = list(range(cot.shape[1]))
  f32 = tuple(x.astype(jnp.float32) for x in args)
  grads = lambda f: jax.jit(jax.grad(lambda x, c: jnp.sum(f(*x).astype(jnp.float32) * c)))
  ref_grad = lambda x, c: grads(lambda *y: inner_loop.ttt_mlp(*y, checkpoint_group_size=G,
                                                              ln_eps=eps))(x, c)
  gref = ref_grad(f32, cot)
  ref_w1, ref_w2 = jax.jit(scan_states, static_argnums=(1, 2))(args, G, eps)
  refs = {"device": gref}
  if a.cpu_ref:
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
      refs["cpu"] = ref_grad(jax.device_put(f32, cpu), jax.device_put(cot, cpu))
      ref_w1c, _ = jax.jit(scan_states, static_argnums=(1, 2))(jax.device_put(args, cpu), G, eps)
    print(json.dumps(dict(
        reference="device vs cpu", max_grad_rel=max(rel(x, y) for x, y in zip(gref, refs["cpu"])),
        XK_per_head=head_summary(per_head_rel(gref[1], refs["cpu"][1]), heads),
        traj_W1=head_summary(trajectory_errors(ref_w1, ref_w1c), heads))), flush=True)
  print(f"device {jax.devices()[0].device_kind}, H={a.heads}, NC={a.nc}, eta {a.eta_scale:g}, "
        f"exact_math={a.exact_math}", flush=True)
  math = mgpu_common.exact_math() if a.exact_math else contextlib.nullcontext()
  with math:
    for v in (x for x in a.variants.split(",") if x):
      fwd = jax.jit(lambda *x, v=v: T._forward(*x, group=G, ln_eps=eps,  # noqa: SLF001
                                               interpret=a.interpret, variant=v))
      _, (w1, _, w2, _) = fwd(*args)
      row = dict(variant=v, exact_math=a.exact_math, NC=a.nc,
                 traj_W1=head_summary(trajectory_errors(w1, ref_w1), heads),
                 traj_W2=head_summary(trajectory_errors(w2, ref_w2), heads))
      print(json.dumps(row), flush=True)
      for bwd in (x for x in a.backwards.split(",") if x):
        g = grads(lambda *x, v=v, bwd=bwd: T.ttt_mlp_pallas(
            *x, checkpoint_group_size=G, ln_eps=eps, interpret=a.interpret, variant=v,
            backward=bwd))(args, cot)
        for where, r in refs.items():
          errs = {n: rel(x, y) for n, x, y in zip(NAMES, g, r)}
          print(json.dumps(dict(variant=v, backward=bwd, exact_math=a.exact_math, NC=a.nc,
                                reference=where, max_grad_rel=max(errs.values()),
                                worst=max(errs, key=errs.get),
                                XK_per_head=head_summary(per_head_rel(g[1], r[1]), heads))),
                flush=True)


if __name__ == "__main__":
  main()
