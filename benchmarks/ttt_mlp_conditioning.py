"""Which heads make the TTT-MLP gradient check ill-conditioned, and what their inner loop does (CPU/GPU).

    python -m benchmarks.ttt_mlp_conditioning --heads 48 --nc 282 --key 1000

On `benchmarks.ttt_mlp_kernel`'s inputs (same keys: 1000 + the NC's position in its --nc list,
cotangent key 7 + that position), float32 XLA scan. Per head:
- `share`: its part of the XK gradient's squared norm (the checks' relative L2 errors are global,
  so a few heads with large gradients decide them);
- `sens`: the relative change of its XK gradient when W1 is scaled by (1 + --perturb), about one
  float32 ulp (how far any rounding can move it);
- the inner loop: mean TTT loss before and after each mini-batch's update (`TTTDiagnostics`), and
  the fraction of updates that raised the loss of their own mini-batch (a gradient step too large
  for the loss's curvature: the LayerNorm after a small Z2 multiplies it by 1 / std(Z2)).
Prints the heads by share, the top ones and a summary of the rest. Not a test; a tool for
NOTES-ttt-mlp.md.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernel_common import per_head_rel
from benchmarks.ttt_mlp_kernel import make_inputs
from ttt_dit.ttt import inner_loop


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--heads", type=int, default=48)
  p.add_argument("--nc", type=int, default=282)
  p.add_argument("--key", type=int, default=1000)
  p.add_argument("--cot_key", type=int, default=7)
  p.add_argument("--group", type=int, default=16)
  p.add_argument("--eta_scale", type=float, default=1e-5)
  p.add_argument("--perturb", type=float, default=1e-7)
  p.add_argument("--top", type=int, default=6)
  a = p.parse_args(argv)
  args = tuple(x.astype(jnp.float32) for x in make_inputs(
      jax.random.PRNGKey(a.key), 1, a.heads, a.nc, eta_scale=a.eta_scale))
  cot = jax.random.normal(jax.random.PRNGKey(a.cot_key), args[0].shape, jnp.float32)
  f = lambda *x: inner_loop.ttt_mlp(*x, checkpoint_group_size=a.group)
  grad_xk = jax.jit(lambda *x: jax.vjp(f, *x)[1](cot)[1])  # [B, H, NC, CS, F]
  g = grad_xk(*args)
  pert = list(args)
  pert[6] = pert[6] * (1 + a.perturb)
  sens = per_head_rel(grad_xk(*pert), g)
  sq = (np.asarray(g, np.float64) ** 2).sum((0, 2, 3, 4))  # [H]
  share = sq / sq.sum()
  _, diag = jax.jit(lambda *x: inner_loop.ttt_mlp(*x, checkpoint_group_size=a.group,
                                                  diagnostics=True))(*args)
  before, after = np.asarray(diag.loss_before[0]), np.asarray(diag.loss_after[0])  # [H, NC]
  raised = (after > before).mean(1)
  order = np.argsort(-share)
  print(f"H={a.heads} NC={a.nc} key={a.key} eta={a.eta_scale:g}: XK gradient, W1 x (1 + "
        f"{a.perturb:g}): global change {np.sqrt((sens ** 2 * sq).sum() / sq.sum()):.2e}")
  print(" head   share     sens  loss before  loss after  updates raising the loss")
  for h in order[:a.top]:
    print(f" {h:4d}  {share[h]:6.1%}  {sens[h]:.1e}  {before[h].mean():11.4f}  {after[h].mean():10.4f}"
          f"  {raised[h]:6.1%}")
  rest = order[a.top:]
  print(f" rest ({len(rest)} heads): share {share[rest].sum():.1%}, sens median {np.median(sens[rest]):.1e}"
        f" max {sens[rest].max():.1e}, updates raising the loss: median {np.median(raised[rest]):.1%}"
        f" max {raised[rest].max():.1%}")
  if raised.std() > 0:  # (no loss-raising update in any head: nothing to correlate)
    corr = np.corrcoef(np.log(sens), raised)[0, 1]
    print(f" correlation over heads of log(sens) and the fraction of loss-raising updates: {corr:.2f}")


if __name__ == "__main__":
  main()
