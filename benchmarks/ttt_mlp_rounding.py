"""How much gradient error does bf16 rounding of matmul operands in the forward trajectory cause? (CPU/GPU)

    python -m benchmarks.ttt_mlp_rounding --heads 48 --nc 282 --eta_scale 1e-5 --modes all,split

Emulates the kernels' forward numerics in XLA: the state trajectory of the TTT-MLP scan with every
matmul operand rounded to bf16 (`all`, as the Mosaic GPU kernels feed wgmma), or all but the
state W1/W2 (`w_precise`: the state as an exact (hi, lo) pair), or every operand rounded to a bf16
(hi, lo) pair (`split`: ~16 mantissa bits, what 3-pass bf16 products would give a kernel), or none
(`none`: a self-check, 0 error), or one product's operands only (`only_z1` K W1, `only_z2` X2 W2,
`only_g1` G2 W2^T, `only_dw1` the W1 update, `only_dw2` the W2 update; the rest exact), or
`split_z` (K W1 and X2 W2 as (hi, lo) pairs, the rest bf16; `split_zg` with G2 W2^T too;
`split_zgw` / `split_zgg` with only W2 / only G2 of G2 W2^T as a pair: which lo half matters;
`split_zw` only the state operands W1, W2 of K W1 and X2 W2 as pairs, X2 bf16); a mode
ending in `+rz` adds W1, W2's updates rounded toward zero; `+trunc` accumulates them as a tensor
core accumulating into the carried state does (each product aligned to the largest addend and
truncated: `truncating_accumulate`); a mode
with `+tanh` (e.g. `split+tanh`) also rounds GELU's tanh to 11 bits (the kernels' tanh.approx). Its states at the checkpoint-group starts then seed the float32 XLA backward (as
`backward="xla_vjp"` does with the kernel's checkpoints), and the gradients are compared with
`jax.vjp` of the float32 scan (same bf16-valued inputs as `benchmarks.ttt_mlp_kernel.make_inputs`).
Prints the max relative L2 error over the ten gradients, and per head for XK (errors concentrate in
a few ill-conditioned heads). Not a test; a tool for NOTES-ttt-mlp.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernel_common import rel, select_heads
from benchmarks.ttt_mlp_kernel import make_inputs
from pallas_kernels import checkpoint_vjp, mgpu_common
from pallas_kernels.ttt_mlp import backward_reference as BR
from ttt_dit.ttt import inner_loop

NAMES = ("XQ", "XK", "XV", "eta", "ln_w", "ln_b", "W1", "b1", "W2", "b2")


def bf16(x):
  """x rounded to bf16, back in float32 (by bits: a jitted astype round trip is removed on GPUs)."""
  return mgpu_common.round_to_bf16(x)


def round_bits(x, bits: int):
  """x with its significand rounded to `bits` bits (a stand-in for an approximate instruction's
  error: tanh.approx.f32 is good to ~2^-11 relative)."""
  m, e = jnp.frexp(x)
  return jnp.ldexp(jnp.round(m * 2.0 ** bits) / 2.0 ** bits, e)


def _gelu_and_grad(x, approx: bool):
  """gelu_tanh(x), gelu_tanh'(x) (inner_loop's), with tanh rounded to 11 bits when approx."""
  if not approx:
    return inner_loop.gelu_tanh(x), inner_loop.gelu_tanh_grad(x)
  tau = round_bits(jnp.tanh(inner_loop.GELU_C * x * (1.0 + 0.044715 * x * x)), 11)
  return (0.5 * x * (1.0 + tau), 0.5 * (1.0 + tau) + 0.5 * x * (1.0 - tau * tau) * (
      inner_loop.GELU_C + inner_loop.GELU_C3 * x * x))


def emulated_update(state, xs, mode: str, ln_eps: float):
  """The state update of one mini-batch with the kernels' operand rounding (`mode`)."""
  W1, b1, W2, b2 = state  # [B,H,F,4F] [B,H,1,4F] [B,H,4F,F] [B,H,1,F]
  XK, XV, eta, gamma, beta = xs  # [B,H,CS,F] x2, [B,H,CS], [H,1,F] x2
  split = lambda x: bf16(x) + bf16(x - bf16(x))
  exact = lambda x: x
  trunc = mode.endswith("+trunc")  # W1, W2 += dW as a tensor core accumulates into the state
  mode = mode.removesuffix("+trunc")
  rz = mode.endswith("+rz")  # W1, W2 += dW rounded toward zero (a wgmma accumulating into W)
  mode = mode.removesuffix("+rz")
  approx = mode.endswith("+tanh")  # the same with tanh to 11 bits (the kernels' tanh.approx)
  mode = mode.removesuffix("+tanh")
  if mode in ("split_z", "split_zg"):  # K W1, X2 W2 (and G2 W2^T) as (hi, lo) pairs, the rest bf16
    pairs = ("z1", "z2") + (("g1",) if mode == "split_zg" else ())
    r = {o: (split if o in pairs else bf16) for o in ("z1", "z2", "g1", "dw1", "dw2")}
  elif mode in ("split_zgw", "split_zgg"):  # split_z, and G2 W2^T with one operand as a pair
    g1 = (bf16, split) if mode == "split_zgw" else (split, bf16)  # (G2, W2)
    r = {"z1": split, "z2": split, "g1": g1, "dw1": bf16, "dw2": bf16}
  elif mode == "split_zw":  # only the state operands of K W1 and X2 W2 as pairs (data bf16)
    r = {o: ((bf16, split) if o in ("z1", "z2") else bf16) for o in ("z1", "z2", "g1", "dw1", "dw2")}
  elif mode.startswith("only_"):  # one product's operands rounded (both), every other one exact
    ops = {"only_z1": "z1", "only_z2": "z2", "only_g1": "g1", "only_dw1": "dw1", "only_dw2": "dw2"}
    if mode not in ops:
      raise ValueError(f"mode {mode!r}: one of {sorted(ops)}")
    r = {o: (bf16 if o == ops[mode] else exact) for o in ops.values()}
  else:
    ro = {"none": exact, "split": split}.get(mode, bf16)        # data operands
    rw = {"all": bf16, "split": split}.get(mode, exact)         # state operands
    r = {o: (ro, rw) for o in ("z1", "z2", "g1")} | {o: (ro, ro) for o in ("dw1", "dw2")}
  rr = lambda o: r[o] if isinstance(r[o], tuple) else (r[o], r[o])
  mm = lambda s, a, b, o: jnp.einsum(s, rr(o)[0](a), rr(o)[1](b), precision="highest")
  XK, XV = XK.astype(jnp.float32), XV.astype(jnp.float32)
  Z1 = mm("bhcf,bhfk->bhck", XK, W1, "z1") + b1                                  # [B,H,CS,4F]
  X2, dgelu = _gelu_and_grad(Z1, approx)
  Z2 = mm("bhck,bhkf->bhcf", X2, W2, "z2") + b2                                  # [B,H,CS,F]
  G2 = inner_loop.ln_l2_grad(Z2, XV - XK, gamma, beta, ln_eps)
  G1 = mm("bhcf,bhkf->bhck", G2, W2, "g1") * dgelu
  eG1 = jnp.einsum("bhj,bhjk->bhk", eta, G1)[:, :, None]
  eG2 = jnp.einsum("bhj,bhjf->bhf", eta, G2)[:, :, None]
  if trunc:
    ek, ex2 = -XK * eta[..., None], -X2 * eta[..., None]
    return (truncating_accumulate(W1, rr("dw1")[0](ek), rr("dw1")[1](G1)), b1 - eG1,
            truncating_accumulate(W2, rr("dw2")[0](ex2), rr("dw2")[1](G2)), b2 - eG2)
  dW1 = mm("bhjf,bhjk->bhfk", XK * eta[..., None], G1, "dw1")
  dW2 = mm("bhjk,bhjf->bhkf", X2 * eta[..., None], G2, "dw2")
  add = add_toward_zero if rz else jnp.add
  return add(W1, -dW1), b1 - eG1, add(W2, -dW2), b2 - eG2


def truncating_accumulate(W, A, Bm, k_step: int = 16, extra_bits: int = 3):
  """W + A^T Bm as a Hopper tensor core accumulates into W, one k-step (16 rows) per
  instruction: every product is aligned to the largest magnitude among W and the step's
  products and truncated (toward zero) to `extra_bits` below that one's float32 ulp (the
  behaviour measured for fp16/bf16 wgmma: Khattak & Mikaitis, 2025). W [B, H, M, N], A
  [B, H, CS, M], Bm [B, H, CS, N] (products exact in float32 for bf16 operands)."""
  for s in range(0, A.shape[2], k_step):
    p = A[:, :, s:s + k_step, :, None] * Bm[:, :, s:s + k_step, None, :]  # [B, H, k, M, N]
    big = jnp.maximum(jnp.abs(W), jnp.max(jnp.abs(p), axis=2))
    grid = jnp.exp2(jnp.floor(jnp.log2(jnp.maximum(big, 1e-30))) - 23 - extra_bits)[:, :, None]
    W = W + jnp.sum(jnp.trunc(p / grid) * grid, axis=2)
  return W


def add_toward_zero(a, b):
  """a + b (float32) rounded toward zero instead of to nearest: the exact sum is s + e (TwoSum);
  where |s| overshoots it (s e < 0), one ulp toward zero."""
  s = a + b
  bb = s - a
  e = (a - (s - bb)) + (b - bb)
  return jnp.where(s * e < 0, jnp.nextafter(s, jnp.zeros_like(s)), s)


def group_outputs(state, q, k, v, e, lw, lb, ln_eps):
  """Float32 XLA dual form over one group's mini-batches from `state`: (outputs, final state)."""
  def body(s, xs):
    qq, kk, vv, ee = xs
    return inner_loop._mlp_step(s, (qq, kk, vv, ee, lw[:, None, :], lb[:, None, :]),  # noqa: SLF001
                                ln_eps=ln_eps, diagnostics=False)
  mv = lambda a: jnp.moveaxis(a, 2, 0)
  s_end, outs = jax.lax.scan(body, state, (mv(q), mv(k), mv(v), mv(e)))
  return jnp.moveaxis(outs, 0, 2), s_end


def grads_from_checkpoints(states, args, cot, G, ln_eps):
  """Gradients of sum(out * cot) by the float32 backward restarted from the states at group starts.

  One jitted group VJP with a traced group start (eagerly sliced at static offsets, every group
  compiled its own small programs: at NC=2750 their code exhausted the process' memory maps)."""
  XQ, XK, XV, eta, lw, lb = (a.astype(jnp.float32) for a in args[:6])
  NC = XQ.shape[2]
  d_state = tuple(jnp.zeros_like(s[0]) for s in states)
  grads = [jnp.zeros_like(a) for a in (XQ, XK, XV, eta)]
  d_lw, d_lb = jnp.zeros_like(lw), jnp.zeros_like(lb)
  for a in reversed(range(0, NC, G)):
    n = min(a + G, NC) - a
    d_state, grads, dlw, dlb = _group_vjp(n, ln_eps, jnp.int32(a), states, d_state, grads,
                                          (XQ, XK, XV, eta, lw, lb), cot)
    d_lw, d_lb = d_lw + dlw, d_lb + dlb
  return tuple(grads) + (d_lw, d_lb) + tuple(d.sum(0) for d in d_state)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _group_vjp(n: int, ln_eps: float, a, states, d_state, grads, inputs, cot):
  """The VJP of the n mini-batches from `a` (traced), restarted from states[a]; writes their
  input cotangents into `grads` and returns the state cotangent at `a`."""
  XQ, XK, XV, eta, lw, lb = inputs
  sl = lambda x: jax.lax.dynamic_slice_in_dim(x, a, n, axis=2)
  s_a = tuple(jax.lax.dynamic_index_in_dim(s, a, axis=0, keepdims=False) for s in states)
  _, vjp = jax.vjp(lambda *x: group_outputs(*x, ln_eps), s_a, sl(XQ), sl(XK), sl(XV), sl(eta),
                   lw, lb)
  d_state, *d_in, dlw, dlb = vjp((sl(cot), d_state))
  grads = [jax.lax.dynamic_update_slice_in_dim(g, d, a, axis=2) for g, d in zip(grads, d_in)]
  return d_state, grads, dlw, dlb


@contextlib.contextmanager
def _rounded_products(on: bool):
  """While on: every matmul of `backward_reference` takes bf16-rounded operands (as wgmma does)."""
  saved = BR.mm, BR.mtm, BR.mmt
  if on:
    BR.mm, BR.mtm, BR.mmt = (lambda a, b, f=f: f(bf16(a), bf16(b)) for f in saved)
  try:
    yield
  finally:
    BR.mm, BR.mtm, BR.mmt = saved


def rounded_group_vjp(where: frozenset):
  """`backward_reference.group_vjp` (the backward kernels' plan: restart the group, then reverse
  it) with bf16 matmul operands in its restart ("restart" in where) and / or its reverse steps
  ("reverse"), for `checkpoint_vjp.vjp_from_checkpoints`."""
  def group_vjp(*args):
    fwd, rev = BR.step_forward, BR.step_reverse

    def step_forward(*a, **k):
      with _rounded_products("restart" in where):
        return fwd(*a, **k)

    def step_reverse(*a, **k):
      with _rounded_products("reverse" in where):
        return rev(*a, **k)

    BR.step_forward, BR.step_reverse = step_forward, step_reverse
    try:  # (traced here: group_vjp looks the two up when its scans are traced)
      return BR.group_vjp(*args)
    finally:
      BR.step_forward, BR.step_reverse = fwd, rev
  return group_vjp


BWD_MODES = {"exact": frozenset(), "restart": frozenset({"restart"}),
             "reverse": frozenset({"reverse"}), "both": frozenset({"restart", "reverse"})}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--nc", type=int, default=282)
  p.add_argument("--group", type=int, default=16)
  p.add_argument("--eta_scale", type=float, default=1e-5)
  p.add_argument("--modes", default="all", help="comma list of all, w_precise, split, none")
  p.add_argument("--key", type=int, default=0,
                 help="input key (benchmarks.ttt_mlp_kernel uses 1000 + the NC's position)")
  p.add_argument("--ln_eps", type=float, default=1e-6)
  p.add_argument("--cot_key", type=int, default=-7,
                 help="cotangent key: PRNGKey(k) for k >= 0 (ttt_mlp_kernel: 7 + the NC's position), "
                      "jax.random.key(-k) for k < 0 (this script's earlier runs: -7)")
  p.add_argument("--bf16_cotangent", action="store_true",
                 help="a bf16-valued cotangent for reference and emulation alike")
  p.add_argument("--kernel_cotangent", action="store_true",
                 help="the reference's cotangent float32, the emulation's rounded to bf16 (what "
                      "ttt_mlp_kernel compared before 2026-12-03)")
  p.add_argument("--bwd_modes", default="",
                 help="comma list of exact, restart, reverse, both: the hand-derived backward "
                      "(backward_reference.group_vjp) with bf16 products in those parts, from the "
                      "exact checkpoints, vs the float32 scan's gradients")
  p.add_argument("--ckpt_pairs", action="store_true",
                 help="with --bwd_modes: the checkpoints stored as bf16 (hi, lo) pairs (~16 "
                      "significand bits), as the kernels store them, instead of float32")
  p.add_argument("--bf16_init", action="store_true",
                 help="with --modes: the emulated trajectory starts from W1, W2 rounded to bf16 "
                      "(what the GPU kernels ran before 2026-12-03: their initial lo halves lost)")
  p.add_argument("--ckpt_hi", action="store_true",
                 help="with --modes: W1, W2 at the group starts rounded to bf16 before the float32 "
                      "backward (checkpoints that lost their lo halves)")
  p.add_argument("--head_ids", default="",
                 help="comma list: only these heads of the --heads inputs (heads are independent)")
  p.add_argument("--perturb", default="",
                 help="comma list of relative sizes: also the float32 scan's own gradients with W1 "
                      "scaled by (1 + size), against the unperturbed ones (the problem's conditioning)")
  a = p.parse_args(argv)
  B, H, NC, G = 1, a.heads, a.nc, a.group
  args = make_inputs(jax.random.PRNGKey(a.key), B, H, NC, eta_scale=a.eta_scale)
  cot = jax.random.normal(jax.random.key(-a.cot_key) if a.cot_key < 0 else
                          jax.random.PRNGKey(a.cot_key), args[0].shape, jnp.float32)
  args, cot = select_heads(args, cot, a.head_ids)
  H = cot.shape[1]
  to_bf16 = bf16
  cot = to_bf16(cot) if a.bf16_cotangent else cot  # (the kernels' bf16 output gets a bf16 one)
  cot_ref = cot  # the reference's; the emulations' below, rounded with --kernel_cotangent
  cot = to_bf16(cot) if a.kernel_cotangent else cot
  XQ, XK, XV, eta, lw, lb, W1, b1, W2, b2 = args
  state0 = tuple(jnp.broadcast_to(s, (B,) + s.shape) for s in (W1, b1, W2, b2))

  def trajectory_of(state0, inputs, mode):  # the state before every mini-batch [NC, B, H, ...]
    XK, XV, eta, lw, lb = inputs  # arguments, not closed over: captured arrays would be compiled
    def body(s, i):               # in as constants (at NC=2750, ~90 MB each: LLVM ran out of memory)
      xs = (XK[:, :, i], XV[:, :, i], eta[:, :, i], lw[:, None, :], lb[:, None, :])
      return emulated_update(s, xs, mode, a.ln_eps), s
    return jax.lax.scan(body, state0, jnp.arange(NC))[1]
  traj_jit = jax.jit(trajectory_of, static_argnums=2)
  trajectory = lambda state0, mode: traj_jit(state0, (XK, XV, eta, lw, lb), mode)

  f = lambda *x: inner_loop.ttt_mlp(*x, checkpoint_group_size=G, ln_eps=a.ln_eps)
  _, vjp = jax.vjp(f, *(x.astype(jnp.float32) for x in args))
  g_ref = vjp(cot_ref)
  for size in (float(x) for x in a.perturb.split(",") if x):
    pert = [x.astype(jnp.float32) for x in args]
    pert[6] = pert[6] * (1 + size)
    _, vjp_p = jax.vjp(f, *pert)
    errs = {n: rel(x, y) for n, x, y in zip(NAMES, vjp_p(cot_ref), g_ref)}
    print(f"H={H} NC={NC} key={a.key} eta={a.eta_scale:g} float32 scan, W1 x (1 + {size:g}): max "
          f"grad rel L2 {max(errs.values()):.2e} (" + ", ".join(f"{n} {v:.1e}" for n, v in errs.items())
          + ")", flush=True)
  norms = np.array([float(jnp.linalg.norm(g_ref[1][:, h])) for h in range(H)])
  top = np.argsort(-norms)[:3]
  f32_args = tuple(x.astype(jnp.float32) for x in args)
  exact_ckpts = None
  for bmode in (m for m in a.bwd_modes.split(",") if m):
    if exact_ckpts is None:
      exact_ckpts = jax.tree.map(lambda s: s[::G], trajectory(state0, "none"))
      if a.ckpt_pairs:
        exact_ckpts = jax.tree.map(lambda s: bf16(s) + bf16(s - bf16(s)), exact_ckpts)
    g_b = jax.jit(lambda ck, x, c, bm=bmode: checkpoint_vjp.vjp_from_checkpoints(
        inner_loop._mlp_step, ck, x, c, group=G, ln_eps=a.ln_eps,  # noqa: SLF001
        group_vjp=rounded_group_vjp(BWD_MODES[bm])))(exact_ckpts, f32_args, cot)
    errs = {n: rel(x, y) for n, x, y in zip(NAMES, g_b, g_ref)}
    per_head = np.array([rel(g_b[1][:, h], g_ref[1][:, h]) for h in range(H)])
    print(f"H={H} NC={NC} key={a.key} backward bf16 in {bmode}"
          f"{', checkpoints as (hi, lo)' if a.ckpt_pairs else ''}: max grad rel L2 "
          f"{max(errs.values()):.2e} (" + ", ".join(f"{n} {v:.1e}" for n, v in errs.items()) +
          f"); XK per head max {per_head.max():.1e} (head {int(per_head.argmax())}), median "
          f"{np.median(per_head):.1e}", flush=True)
  for mode in (m for m in a.modes.split(",") if m):
    s0 = (bf16(state0[0]), state0[1], bf16(state0[2]), state0[3]) if a.bf16_init else state0
    states = trajectory(s0, mode)
    if a.ckpt_hi:
      states = (bf16(states[0]), states[1], bf16(states[2]), states[3])
    g_emu = grads_from_checkpoints(states, args, cot, G, a.ln_eps)
    errs = {n: rel(x, y) for n, x, y in zip(NAMES, g_emu, g_ref)}
    print(f"H={H} NC={NC} key={a.key} eta={a.eta_scale:g} mode={mode}: max grad rel L2 "
          f"{max(errs.values()):.2e} (" + ", ".join(f"{n} {v:.1e}" for n, v in errs.items()) + ")")
    per_head = np.array([rel(g_emu[1][:, h], g_ref[1][:, h]) for h in range(H)])
    print(f"  XK per head: max {per_head.max():.1e}, median {np.median(per_head):.1e}, "
          f"{int((per_head >= 2e-2).sum())} of {H} heads >= 2e-2; the 3 largest-gradient heads hold "
          f"{float(np.linalg.norm(norms[top]) / np.linalg.norm(norms)):.0%} of the norm, errors "
          + ", ".join(f"{per_head[h]:.1e}" for h in top), flush=True)
    worst = np.argsort(-per_head)[:3]
    print("  XK worst heads (head: error, share of the norm): " + ", ".join(
        f"{h}: {per_head[h]:.1e}, {norms[h] ** 2 / (norms ** 2).sum():.1%}" for h in worst), flush=True)


if __name__ == "__main__":
  main()
