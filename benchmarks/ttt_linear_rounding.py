"""Which bf16 rounding in the TTT-Linear kernel's forward trajectory moves the gradients? (CPU/GPU)

    python -m benchmarks.ttt_linear_rounding --nc 2750 --key 1000 --cot_key 7 --head_ids 31 \
        --modes none,all,split_z,only_z,only_dw

Emulates `pallas_kernels/ttt_linear/kernel_mgpu.py`'s state trajectory in XLA: Z1 = K W1 with W1
as bf16 (`all`, `only_z`) or as its bf16 (hi, lo) pair (`split_z`, LinearTuningConfig.split_state),
the update (-eta K)^T G1 with both operands bf16 (`all`, `split_z`, `only_dw`), or nothing rounded
(`none`: a self-check, 0 error). The states at the checkpoint-group starts then seed the float32
XLA backward (`checkpoint_vjp.vjp_from_checkpoints`, as `backward="xla_vjp"` does with the kernel's
checkpoints) and the gradients are compared with `jax.vjp` of the float32 scan, on
`benchmarks.ttt_linear_kernel.make_inputs` draws with a bf16-valued cotangent. Prints the max
relative L2 error over the eight gradients and per head for XK. Not a test; a tool for
NOTES-ttt-linear.md (the TTT-MLP counterpart: `benchmarks.ttt_mlp_rounding`).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernel_common import rel, select_heads
from benchmarks.ttt_linear_kernel import make_inputs
from benchmarks.ttt_mlp_rounding import bf16
from pallas_kernels import checkpoint_vjp
from ttt_dit.ttt import inner_loop

NAMES = ("XQ", "XK", "XV", "eta", "ln_w", "ln_b", "W1", "b1")
MODES = ("none", "all", "split_z", "only_z", "only_dw")


def pair(x):
  """x as the sum of its bf16 (hi, lo) pair (~16 significand bits)."""
  return bf16(x) + bf16(x - bf16(x))


def emulated_update(state, xs, mode: str, ln_eps: float):
  """One mini-batch's state update (W1, b1) with the kernel's operand rounding (`mode`)."""
  if mode not in MODES:
    raise ValueError(f"mode {mode!r}: one of {MODES}")
  W1, b1 = state  # [B, H, F, F], [B, H, 1, F]
  XK, XV, eta, gamma, beta = xs  # [B, H, CS, F] x2 (bf16 values), [B, H, CS], [H, 1, F] x2
  exact = lambda x: x
  rw = {"all": bf16, "only_z": bf16, "split_z": pair}.get(mode, exact)  # W1 in K W1
  rd = bf16 if mode in ("all", "split_z", "only_dw") else exact  # -eta K and G1 in the update
  XK, XV = XK.astype(jnp.float32), XV.astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  Z1 = jnp.einsum("bhcf,bhfg->bhcg", XK, rw(W1), precision=hi) + b1  # [B, H, CS, F]
  G1 = inner_loop.ln_l2_grad(Z1, XV - XK, gamma, beta, ln_eps)
  eG1 = jnp.einsum("bhj,bhjf->bhf", eta, G1, precision=hi)[:, :, None]  # [B, H, 1, F] (float32)
  dW1 = jnp.einsum("bhjf,bhjg->bhfg", rd(XK * eta[..., None]), rd(G1), precision=hi)
  return W1 - dW1, b1 - eG1


@functools.partial(jax.jit, static_argnums=(2, 3))
def trajectory(state0, inputs, mode: str, ln_eps: float):
  """The emulated state before every mini-batch, [NC, B, H, ...] (inputs as arguments: closed
  over, NC=2750's arrays would be compiled in as constants)."""
  XK, XV, eta, lw, lb = inputs
  def body(s, i):
    xs = (XK[:, :, i], XV[:, :, i], eta[:, :, i], lw[:, None, :], lb[:, None, :])
    return emulated_update(s, xs, mode, ln_eps), s
  return jax.lax.scan(body, state0, jnp.arange(XK.shape[2]))[1]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--heads", type=int, default=48)
  p.add_argument("--nc", type=int, default=282)
  p.add_argument("--group", type=int, default=16)
  p.add_argument("--eta_scale", type=float, default=1e-5)
  p.add_argument("--modes", default="none,all,split_z", help=f"comma list of {', '.join(MODES)}")
  p.add_argument("--key", type=int, default=1000,
                 help="input key (benchmarks.ttt_linear_kernel: 1000 + the NC's position)")
  p.add_argument("--cot_key", type=int, default=7, help="cotangent PRNGKey (the benchmark: 7 + position)")
  p.add_argument("--head_ids", default="", help="comma list: only these heads (heads are independent)")
  p.add_argument("--ln_eps", type=float, default=1e-6)
  a = p.parse_args(argv)
  B, G = 1, a.group
  args = make_inputs(jax.random.PRNGKey(a.key), B, a.heads, a.nc, eta_scale=a.eta_scale)
  cot = jax.random.normal(jax.random.PRNGKey(a.cot_key), args[0].shape, jnp.float32)
  args, cot = select_heads(args, cot, a.head_ids)
  cot = bf16(cot)  # bf16-valued: what the kernel's VJP gets
  H = cot.shape[1]
  f32 = tuple(x.astype(jnp.float32) for x in args)
  XQ, XK, XV, eta, lw, lb, W1, b1 = f32
  state0 = tuple(jnp.broadcast_to(s, (B,) + s.shape) for s in (W1, b1))
  f = lambda *x: inner_loop.ttt_linear(*x, checkpoint_group_size=G, ln_eps=a.ln_eps)
  g_ref = jax.vjp(f, *f32)[1](cot)
  grads = jax.jit(lambda ck, x, c: checkpoint_vjp.vjp_from_checkpoints(
      inner_loop._linear_step, ck, x, c, group=G, ln_eps=a.ln_eps))  # noqa: SLF001
  for mode in (m for m in a.modes.split(",") if m):
    states = trajectory(state0, (XK, XV, eta, lw, lb), mode, a.ln_eps)
    g = grads(jax.tree.map(lambda s: s[::G], states), f32, cot)
    errs = {n: rel(x, y) for n, x, y in zip(NAMES, g, g_ref)}
    per_head = np.array([rel(g[1][:, h], g_ref[1][:, h]) for h in range(H)])
    print(f"H={H} NC={a.nc} key={a.key} eta={a.eta_scale:g} mode={mode}: max grad rel L2 "
          f"{max(errs.values()):.2e} (" + ", ".join(f"{n} {v:.1e}" for n, v in errs.items())
          + f"); XK per head max {per_head.max():.1e} (head {int(per_head.argmax())}), median "
          f"{np.median(per_head):.1e}", flush=True)


if __name__ == "__main__":
  main()
