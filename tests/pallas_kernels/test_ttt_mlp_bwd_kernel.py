"""CPU tests of the TTT-MLP backward kernel (`kernel_bwd_mgpu`, `backward="pallas"`).

Interpret mode runs the cluster-1 kernel (whole hidden dim in one CTA); the cluster-2 kernel (DSMEM
exchange, in-place accumulation) is lowered for CUDA here and run only on the GPU
(benchmarks/ttt_mlp_kernel.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.ttt_mlp import kernel_acc_mgpu, kernel_bwd_mgpu, ttt_mlp_pallas
from pallas_kernels.ttt_mlp import ttt_mlp as T
from kernel_testing import rel, ttt_inputs
from ttt_dit.ttt import inner_loop

NAMES = ("XQ", "XK", "XV", "eta", "ln_weight", "ln_bias", "W1", "b1", "W2", "b2")


@pytest.mark.parametrize("backward", ["pallas", "pallas_dw_gmem", "pallas_saved", "pallas_qpass"])
def test_backward_kernel_gradients_batch_and_groups_interpret(backward):
  """B = 2 (state cotangents summed over the batch), NC = 3 with G = 2: two groups (the state
  cotangent carried between them), the last one short. Every gradient vs jax.grad of the float32
  XLA scan, rel L2 < 2e-2 (measured <= 5.7e-3 at NC = 3..5: bf16 matmul operands in forward and
  backward; a sign flip in the LN-L2 VJP gives 0.39)."""
  B, H, NC, G = 2, 1, 3, 2
  args = ttt_inputs(B, H, NC, 5)
  cot = jax.random.normal(jax.random.PRNGKey(11), (B, H, NC, 64, 64))
  f32 = tuple(a.astype(jnp.float32) for a in args)

  def loss(fn, a):
    return jnp.sum(fn(*a).astype(jnp.float32) * cot)

  want = jax.grad(lambda a: loss(lambda *x: inner_loop.ttt_mlp(*x, checkpoint_group_size=G),
                                 a))(f32)
  got = jax.grad(lambda a: loss(lambda *x: ttt_mlp_pallas(
      *x, checkpoint_group_size=G, interpret=True, backward=backward), a))(args)
  for name, x, y in zip(NAMES, got, want):
    assert x.shape == y.shape and x.dtype == args[NAMES.index(name)].dtype, name
    assert bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))), name
    err = rel(x, y)
    assert err < 2e-2, (name, err)


def test_groups_per_launch(monkeypatch):
  """Launch sizing covers every group within the byte budget, trading padded groups against
  launches (BWD_LAUNCH_COST_GROUPS each)."""
  per_group = 2 * 3 * T._RESTART_STEP_BYTES  # BH = 2, G = 2
  assert T.groups_per_launch(3, 2, 2, 0) == (1, 3)
  assert T.groups_per_launch(3, 2, 2, 2 * per_group) == (1, 3)  # a padded group costs more
  assert T.groups_per_launch(3, 2, 2, 10 * per_group) == (3, 1)
  # 63 groups, at most 18 per launch: 7 x 9 (no padding) beats 4 x 16 (one padded group)
  assert T.groups_per_launch(63, 48, 16, 18 * 48 * 17 * T._RESTART_STEP_BYTES) == (9, 7)
  monkeypatch.setattr(T, "BWD_LAUNCH_COST_GROUPS", 10.0)  # launches dear: padding accepted
  assert T.groups_per_launch(3, 2, 2, 2 * per_group) == (2, 2)  # 4 slots for 3 groups
  assert T.groups_per_launch(63, 48, 16, 18 * 48 * 17 * T._RESTART_STEP_BYTES) == (16, 4)


def test_restart_final_checkpoint_interpret():
  """The restart kernel with `final_checkpoint` over G steps gives the G + 1 states of the same
  kernel run over G + 1 steps (the last step's inputs only move states after it): bitwise."""
  B, H, NC, G = 1, 1, 3, 2
  args = ttt_inputs(B, H, NC, 5)
  q, k, v, e, *rest = T.kernel_args(*args, "v3")
  full = T._build(B * H, G + 1, 1, 1e-6, True, "v3", outputs=False, checkpoint_lo=False)(
      q, k, v, e, *rest)
  fin = T._build(B * H, G, 1, 1e-6, True, "v3", outputs=False, checkpoint_lo=False,
                 final_checkpoint=True)(q[:, :G], k[:, :G], v[:, :G], e[:, :G], *rest)
  for i in (1, 3, 4, 6):  # hi states and biases: [BH, G + 1, ...] both
    assert fin[i].shape == full[i].shape, (i, fin[i].shape, full[i].shape)
    assert bool(jnp.array_equal(fin[i], full[i])), i
  with pytest.raises(ValueError, match="multiple of group"):
    T._build(B * H, 3, 2, 1e-6, True, "v3", final_checkpoint=True)


def test_backward_launch_grouping_does_not_change_gradients(monkeypatch):
  """NC = 5, G = 2 (3 groups, the last short): the backward with 2 groups per launch (one padded
  group restarted from the last checkpoint) equals the one-launch backward (3 groups): same
  per-step arithmetic, so rel L2 < 1e-6 (only LN weight/bias sums change order); and it is within
  2e-2 of jax.grad of the float32 XLA scan. (One group per launch runs in
  `test_saved_forward_backward_is_bitwise_the_recomputing_one[0]` and on the plain side of
  `test_fused_restarts_give_the_plain_gradients`.)"""
  groups_per_launch = 2
  B, H, NC, G = 1, 2, 5, 2
  args = ttt_inputs(B, H, NC, 7)
  cot = jax.random.normal(jax.random.PRNGKey(12), (B, H, NC, 64, 64))
  per_group = B * H * (G + 1) * (T._RESTART_STEP_BYTES + T._QPASS_STEP_BYTES)
  monkeypatch.setattr(T, "BWD_LAUNCH_COST_GROUPS", 10.0)  # 2 per launch: one padded group

  def grads(budget):
    monkeypatch.setattr(T, "BWD_LAUNCH_BYTES", budget)
    return jax.grad(lambda a: jnp.sum(ttt_mlp_pallas(
        *a, checkpoint_group_size=G, interpret=True).astype(jnp.float32) * cot))(args)

  one = grads(3 * per_group)
  got = grads(groups_per_launch * per_group)
  want = jax.grad(lambda a: jnp.sum(inner_loop.ttt_mlp(
      *a, checkpoint_group_size=G).astype(jnp.float32) * cot))(
          tuple(a.astype(jnp.float32) for a in args))
  for name, x, y, z in zip(NAMES, got, one, want):
    assert rel(x, y) < 1e-6, (name, rel(x, y))
    assert rel(x, z) < 2e-2, (name, rel(x, z))


def test_fused_restarts_give_the_plain_gradients(monkeypatch):
  """FUSED_RESTARTS (launch s's backward kernel and launch s - 1's restarts in one two-role
  launch, launches in pairs) gives the gradients of the plain scan (interpret, cluster 1; NC = 5,
  G = 2, one group per launch: 3 launches plain, 4 fused (one padded group); H = 2 rows of
  restarts walked by one program, so the restart role loops over rows). A pair body that
  restarted launch s instead of s - 1 was seen to give 0.059. (The default backward only; the
  two-role launch is the same for the others, and backward="pallas" was seen to agree too.)"""
  backward = "pallas_qpass"
  B, H, NC, G = 1, 2, 5, 2
  args = ttt_inputs(B, H, NC, 7)
  cot = jax.random.normal(jax.random.PRNGKey(12), (B, H, NC, 64, 64))
  per_group = B * H * (G + 1) * (T._RESTART_STEP_BYTES + (
      T._QPASS_STEP_BYTES if backward == "pallas_qpass" else 0))
  monkeypatch.setattr(T, "RESTART_PROGRAMS", 1)

  def grads(fused):
    monkeypatch.setattr(T, "FUSED_RESTARTS", fused)
    monkeypatch.setattr(T, "BWD_LAUNCH_BYTES", (2 if fused else 1) * per_group)  # 1 group each
    return jax.grad(lambda a: jnp.sum(ttt_mlp_pallas(
        *a, checkpoint_group_size=G, interpret=True, backward=backward).astype(jnp.float32)
        * cot))(args)

  plain, fused = grads(False), grads(True)
  for name, x, y in zip(NAMES, fused, plain):
    assert rel(x, y) < 1e-6, (name, rel(x, y))


def _grads_with(monkeypatch, constant: str, value, B: int, seed: int, key: int, NC=3, G=2):
  """The 10 gradients of sum(ttt_mlp_pallas(...) * cot) (interpret, the default backward) with the
  module constant `constant` of `ttt_mlp` set to `value` (H = 1)."""
  args = ttt_inputs(B, 1, NC, seed)
  cot = jax.random.normal(jax.random.PRNGKey(key), (B, 1, NC, 64, 64))
  monkeypatch.setattr(T, constant, value)
  return jax.grad(lambda a: jnp.sum(ttt_mlp_pallas(
      *a, checkpoint_group_size=G, interpret=True).astype(jnp.float32) * cot))(args)


def test_lazy_waits_give_bitwise_the_same_gradients(monkeypatch):
  """BWD_LAZY_WAITS (each of a step's loads waited just before its first use) changes no
  arithmetic: gradients bitwise those with all loads waited at the step's start (interpret,
  cluster 1, NC = 3, G = 2: two groups)."""
  grads = lambda lazy: _grads_with(monkeypatch, "BWD_LAZY_WAITS", lazy, 1, 5, 11)
  for name, x, y in zip(NAMES, grads(True), grads(False)):
    assert bool(jnp.array_equal(x, y)), (name, rel(x, y))
  with pytest.raises(ValueError, match="query_pass"):
    kernel_bwd_mgpu.BwdTuningConfig(lazy_waits=True)


@pytest.mark.parametrize("fused", [1, 2])
def test_fused_column_sums_give_the_same_gradients(fused, monkeypatch):
  """BWD_FUSED_SUMS (the backward kernel's column sums as one reduction of their concatenation)
  gives the gradients of separate sums (interpret, cluster 1, NC = 3, G = 2: two groups, B = 2).
  Not bitwise here: XLA:CPU, which compiles the interpreted kernel, orders a [64, 192] column sum
  differently from a [64, 64] one (measured: LN weight / bias / biases 1-4e-6, XK 1.3e-4 through
  bf16 roundings downstream); a swapped or misplaced slice of the fused sum moves them by O(1).
  On the GPU, `benchmarks.ttt_mlp_bwd_ablate ab BWD_FUSED_SUMS` prints the difference."""
  grads = lambda level: _grads_with(monkeypatch, "BWD_FUSED_SUMS", level, 2, 7, 12)
  for name, x, y in zip(NAMES, grads(fused), grads(0)):
    assert rel(x, y) < 1e-3, (name, rel(x, y))
  cfg = kernel_bwd_mgpu.BwdTuningConfig(fused_sums=fused, reduction_scratch=2048)
  assert cfg.scratch_bytes == 3 * 2048
  with pytest.raises(ValueError, match="fused_sums must be 0, 1 or 2"):
    kernel_bwd_mgpu.BwdTuningConfig(fused_sums=3)


# (several groups side by side in one launch: `test_backward_launch_grouping_...`)
@pytest.mark.parametrize("launch_bytes", [0])
def test_saved_forward_backward_is_bitwise_the_recomputing_one(launch_bytes, monkeypatch):
  """backward="pallas_saved" (the restart saves X2 / Z2 of keys and queries; the backward kernel
  loads them instead of recomputing) gives bitwise the gradients of "pallas" (interpret, cluster
  1, NC = 3, G = 2: two groups, the last short; one group per launch, or both in one launch)."""
  monkeypatch.setattr(T, "BWD_LAUNCH_BYTES", launch_bytes)
  B, H, NC, G = 1, 1, 3, 2
  args = ttt_inputs(B, H, NC, 5)
  cot = jax.random.normal(jax.random.PRNGKey(11), (B, H, NC, 64, 64))
  grads = [jax.grad(lambda a: jnp.sum(ttt_mlp_pallas(
      *a, checkpoint_group_size=G, interpret=True, backward=bw).astype(jnp.float32) * cot))(args)
           for bw in ("pallas", "pallas_saved")]
  for name, x, y in zip(NAMES, *grads):
    assert bool(jnp.array_equal(x, y)), (name, rel(y, x))


def _bwd_args(bh, g, groups=1):
  S = jax.ShapeDtypeStruct
  bf, f32 = jnp.bfloat16, jnp.float32
  ns, rows = groups * g, bh * groups
  return ((S((bh, ns + 1, 64, 64), bf),) * 3
          + (S((bh, ns + 1, 64), f32), S((bh, ns, 64, 64), bf), S((bh, 64), f32), S((bh, 64), f32),
             S((rows, g + 1, 4, 64, 64), bf), S((rows, g + 1, 4, 64), f32),
             S((rows, g + 1, 4, 64, 64), bf), S((rows, g + 1, 64), f32), S((bh, 4, 64, 64), f32),
             S((bh, 4, 64), f32), S((bh, 4, 64, 64), f32), S((bh, 64), f32)))


@pytest.mark.parametrize("dw_gmem,groups,saved,qpass,lazy,fused", [
    (False, 1, False, False, False, 0), (True, 1, False, False, False, 0),
    (False, 3, False, False, False, 0), (False, 2, True, False, False, 0),
    (False, 2, True, True, False, 0), (False, 2, True, True, True, 0),
    (False, 2, True, True, True, 2)])
def test_backward_kernel_cluster2_lowers_for_cuda(dw_gmem, groups, saved, qpass, lazy, fused):
  """The GPU configuration (cluster 2, 2 exchange slots, SMEM under the 227 KiB limit) lowers;
  also with dW kept in GMEM (dw_gmem), over 3 groups in one launch, fed saved activations, and
  with the queries' reverse from outside (query_pass: no dQ partials), with its loads waited
  lazily, and with its column sums fused (3x the reduction scratch)."""
  bh, g = 4, 16
  fn = kernel_bwd_mgpu.build_backward(
      bh, g, 1e-6, groups=groups,
      config=kernel_bwd_mgpu.BwdTuningConfig(cluster=2, dw_gmem=dw_gmem, saved_forward=saved,
                                             query_pass=qpass, lazy_waits=lazy,
                                             fused_sums=fused))
  args = _bwd_args(bh, g, groups)
  S, ns = jax.ShapeDtypeStruct, groups * g
  rows = bh * groups
  if qpass:  # kx2, kg2, kxh, kh, krstd; per step qx2, dz1, db1q, db2q
    args += ((S((rows, g + 1, 4, 64, 64), jnp.bfloat16),)
             + (S((rows, g + 1, 64, 64), jnp.bfloat16),) * 3 + (S((rows, g + 1, 64), jnp.float32),)
             + (S((bh, ns, 4, 64, 64), jnp.bfloat16), S((bh, ns, 4, 64, 64), jnp.bfloat16),
                S((bh, ns, 4, 64), jnp.float32), S((bh, ns, 64), jnp.float32)))
  elif saved:  # kx2, kz2, qx2, qz2
    args += (S((rows, g + 1, 4, 64, 64), jnp.bfloat16), S((rows, g + 1, 64, 64), jnp.float32)) * 2
  lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text().lower()
  outs = jax.eval_shape(fn, *args)
  if qpass:  # no dq_part
    assert outs[0].shape == (bh, 2, ns, 64, 64) and outs[5].shape == (bh, 4, 64, 64)
    assert len(outs) == 9
  else:
    assert outs[0].shape == (bh, 2, ns, 64, 64) and outs[6].shape == (bh, 4, 64, 64)


def test_fused_backward_and_restart_cluster2_lowers_for_cuda():
  """The two-role launch of FUSED_RESTARTS at the GPU configuration (cluster 2: the backward
  kernel with the queries' reverse from outside, the restart with save_ln and the final
  checkpoint, their SMEM in one union under the 227 KiB limit) lowers for CUDA."""
  from pallas_kernels import mgpu_common
  bh, g, groups = 4, 16, 2
  rows, ns = bh * groups, groups * g
  bwd = kernel_bwd_mgpu.build_backward(
      bh, g, 1e-6, groups=groups, parts=True,
      config=kernel_bwd_mgpu.BwdTuningConfig(cluster=2, saved_forward=True, query_pass=True))
  rst = kernel_acc_mgpu.build_forward_acc(
      rows, g, 1, 1e-6, parts=True, config=kernel_acc_mgpu.AccTuningConfig(
          cluster=2, outputs=False, save_activations=True, save_ln=True, checkpoint_lo=False,
          final_checkpoint=True))
  fn = mgpu_common.two_role_kernel(bwd, 24, bh, rst, 12, rows, 16)
  S, bf, f32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float32
  args = (_bwd_args(bh, g, groups)
          + (S((rows, g + 1, 4, 64, 64), bf),) + (S((rows, g + 1, 64, 64), bf),) * 3
          + (S((rows, g + 1, 64), f32), S((bh, ns, 4, 64, 64), bf), S((bh, ns, 4, 64, 64), bf),
             S((bh, ns, 4, 64), f32), S((bh, ns, 64), f32))
          + (S((rows, g, 64, 64), bf),) * 3 + (S((rows, g, 64), f32),)
          + (S((rows, 64), f32),) * 2 + (S((rows, 4, 64, 64), bf),) * 2 + (S((rows, 4, 64), f32),)
          + (S((rows, 4, 64, 64), bf),) * 2 + (S((rows, 64), f32),))
  lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text().lower()
  outs = jax.eval_shape(fn, *args)
  assert len(outs) == 9 + 12 and outs[10].shape == (rows, g + 1, 4, 64, 64)


def test_query_pass_needs_saved_forward():
  with pytest.raises(ValueError, match="saved_forward"):
    kernel_bwd_mgpu.BwdTuningConfig(query_pass=True)


def test_backward_kernel_rejects_odd_group():
  """The kernel walks steps in pairs; `ttt_mlp_pallas` rounds an odd checkpoint group up."""
  with pytest.raises(ValueError, match="even"):
    kernel_bwd_mgpu.build_backward(2, 3, 1e-6)


# (the XLA query pass is the kernel's reference: `test_query_reverse_kernel_matches_its_...`)
@pytest.mark.parametrize("query_pass", ["kernel"])
def test_query_pass_backward_matches_the_saved_one(query_pass, monkeypatch):
  """backward="pallas_qpass" (the output path's reverse for all steps at once, by the
  `kernel_qrev_mgpu` kernel or by XLA; the backward kernel adds its part of dW and takes the keys'
  LayerNorm-L2 parts from the restart) vs "pallas_saved" (all inside the backward kernel),
  interpret mode, B = 2, NC = 3, G = 2: every gradient within rel L2 5e-3 (measured <= 1.2e-3: dQ
  is no longer summed from bf16 per-CTA partials, and the restart's LayerNorm, whose parts are
  now stored, is compiled differently by XLA on CPU: 1-ulp changes of the trajectory)."""
  monkeypatch.setattr(T, "QUERY_PASS", query_pass)
  B, H, NC, G = 2, 1, 3, 2
  args = ttt_inputs(B, H, NC, 5)
  cot = jax.random.normal(jax.random.PRNGKey(11), (B, H, NC, 64, 64))
  saved, qpass = (jax.grad(lambda a: jnp.sum(ttt_mlp_pallas(
      *a, checkpoint_group_size=G, interpret=True, backward=bw).astype(jnp.float32) * cot))(args)
                  for bw in ("pallas_saved", "pallas_qpass"))
  for name, x, y in zip(NAMES, qpass, saved):
    assert rel(x, y) < 5e-3, (name, rel(x, y))


def test_query_reverse_kernel_matches_its_xla_reference():
  """`kernel_qrev_mgpu` (interpret) vs `query_reverse` on the same per-step states: 2 heads x 2
  groups of 2 steps; bf16 outputs within 1e-2, float32 ones within 1e-3 (measured: equal up to
  XLA's summation order). A state index off by one step fails it (tested: X2b 1.3)."""
  from pallas_kernels.ttt_mlp import kernel_qrev_mgpu, query_reverse
  bh, S, G = 2, 2, 2
  ks = jax.random.split(jax.random.PRNGKey(5), 8)
  n = lambda k, s, sc=1.0: sc * jax.random.normal(k, s)
  q = n(ks[0], (bh, S * G, 64, 64)).astype(jnp.bfloat16)
  do = n(ks[1], (bh, S * G, 64, 64)).astype(jnp.bfloat16)
  sw1 = n(ks[2], (bh * S, G + 1, 4, 64, 64), 0.1).astype(jnp.bfloat16)
  sw2 = n(ks[3], (bh * S, G + 1, 4, 64, 64), 0.1).astype(jnp.bfloat16)
  sb1, sb2 = n(ks[4], (bh * S, G + 1, 4, 64), 0.1), n(ks[5], (bh * S, G + 1, 64), 0.1)
  gam, bet = 1.0 + n(ks[6], (bh, 64), 0.1), n(ks[7], (bh, 64), 0.1)
  got = query_reverse.QueryReverse(*kernel_qrev_mgpu.build_query_reverse(
      bh, S, G, 1e-6, interpret=jax.experimental.pallas.mosaic_gpu.InterpretGPUParams())(
          q, do, sw1, sb1, sw2, sb2, gam))
  after = lambda a: a[:, 1:].reshape((bh, S * G) + a.shape[2:])
  want = query_reverse.query_reverse(q, do, after(sw1), after(sb1), after(sw2), after(sb2),
                                     gam[:, None], bet[:, None], 1e-6)
  for name, x, y in zip(query_reverse.QueryReverse._fields, got, want):
    tol = 1e-2 if x.dtype == jnp.bfloat16 else 1e-3
    assert x.shape == y.shape and rel(x, y) < tol, (name, rel(x, y))
  # dq_dtype=bf16: dQ rounded in the kernel, bitwise the float32 dQ's cast; the rest unchanged
  got16 = query_reverse.QueryReverse(*kernel_qrev_mgpu.build_query_reverse(
      bh, S, G, 1e-6, dq_dtype=jnp.bfloat16,
      interpret=jax.experimental.pallas.mosaic_gpu.InterpretGPUParams())(
          q, do, sw1, sb1, sw2, sb2, gam))
  assert got16.dq.dtype == jnp.bfloat16
  assert jnp.array_equal(got16.dq, got.dq.astype(jnp.bfloat16))
  for name, x, y in zip(query_reverse.QueryReverse._fields, got16, got):
    assert name == "dq" or jnp.array_equal(x, y), name
  with pytest.raises(ValueError, match="dq_dtype must be"):
    kernel_qrev_mgpu.build_query_reverse(bh, S, G, 1e-6, dq_dtype=jnp.float16)


def test_query_reverse_kernel_lowers_for_cuda():
  """The one-CTA-per-step kernel (grid (BH, S G), SMEM ~131 KiB) lowers for CUDA."""
  from pallas_kernels.ttt_mlp import kernel_qrev_mgpu
  bh, S, G = 2, 2, 4
  Sd, bf, f32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float32
  fn = kernel_qrev_mgpu.build_query_reverse(bh, S, G, 1e-6)
  args = (Sd((bh, S * G, 64, 64), bf), Sd((bh, S * G, 64, 64), bf),
          Sd((bh * S, G + 1, 4, 64, 64), bf), Sd((bh * S, G + 1, 4, 64), f32),
          Sd((bh * S, G + 1, 4, 64, 64), bf), Sd((bh * S, G + 1, 64), f32), Sd((bh, 64), f32))
  lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text().lower()
  assert jax.eval_shape(fn, *args)[5].shape == (bh, S * G, 64, 64)
  fn16 = kernel_qrev_mgpu.build_query_reverse(bh, S, G, 1e-6, dq_dtype=bf)  # (bf16 dQ tile)
  assert "mosaic_gpu" in jax.jit(fn16).trace(*args).lower(
      lowering_platforms=("cuda",)).as_text().lower()
  assert jax.eval_shape(fn16, *args)[5].dtype == bf


@pytest.mark.parametrize("one_launch", [True, False])
def test_one_launch_backward_has_no_loop(one_launch, monkeypatch):
  """All checkpoint groups in one launch: the backward calls its body once (no `lax.scan` of length
  1 whose results XLA would stack with copies); more launches keep the loop. The GPU program,
  lowered for CUDA here (cluster 2, NC = 3, G = 2: two groups)."""
  monkeypatch.setattr(T, "BWD_LAUNCH_BYTES", T.BWD_LAUNCH_BYTES if one_launch else 0)
  monkeypatch.setattr(T.platform, "not_hopper_reason", lambda: None)
  args = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in ttt_inputs(1, 1, 3, 5))

  def fwd_bwd(*a):
    out, vjp = jax.vjp(lambda *x: ttt_mlp_pallas(*x, checkpoint_group_size=2), *a)
    return vjp(out)

  text = jax.jit(fwd_bwd).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text.lower()
  assert ("stablehlo.while" in text) != one_launch
