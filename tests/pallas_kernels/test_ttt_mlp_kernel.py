"""CPU tests of the TTT-MLP Mosaic GPU kernel: interpret mode vs the XLA scan, CUDA lowering, fallback.

The GPU-only parts (real shapes, timing, the compiled kernel's numerics) live in
benchmarks/ttt_mlp_kernel.py and are run with the device tool.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.ttt_mlp import kernel_acc_mgpu, kernel_mgpu, ttt_mlp_pallas
from kernel_testing import races_in_forward_kernel, rel, ttt_inputs
from ttt_dit.ttt import inner_loop

B, H, NC, CS, F = 1, 1, 3, 64, 64
GROUP = 2  # NC = 3 -> two checkpoint groups, the last one short


def _inputs(seed: int = 0):
  """Float32 copies of bf16-valued TTT-MLP inputs with large steps (the state really moves)."""
  return tuple(a.astype(jnp.float32) for a in ttt_inputs(B, H, NC, seed))


@pytest.mark.parametrize("variant", ["v2", "v3", "v3_precise", "v3_3pass", "v4", "v5",
                                     pytest.param("v6", marks=pytest.mark.serial), "v4l"])
def test_forward_matches_xla_scan_interpret(variant):
  """Kernel (interpret mode) outputs vs the float32 XLA scan: bf16 matmuls, so rel L2 < 1e-2.

  v3 runs at cluster 1 here (the whole hidden dim in one CTA, no exchange).
  """
  args = _inputs(0)
  ref = inner_loop.ttt_mlp(*args, checkpoint_group_size=GROUP)
  XQ16 = args[0].astype(jnp.bfloat16)
  out = ttt_mlp_pallas(XQ16, *args[1:], checkpoint_group_size=GROUP, interpret=True,
                       variant=variant)
  assert out.shape == ref.shape and out.dtype == jnp.bfloat16
  delta, delta_ref = out.astype(jnp.float32) - args[0], ref - args[0]
  err = rel(delta, delta_ref)
  assert err < 1e-2, err
  # The update matters: with the initial state frozen (eta = 0) the outputs are far off.
  frozen = inner_loop.ttt_mlp(*args[:3], jnp.zeros_like(args[3]), *args[4:],
                              checkpoint_group_size=GROUP)
  assert rel(frozen - args[0], delta_ref) > 10 * err


@pytest.mark.parametrize("variant", ["v4", "v5", pytest.param("v6", marks=pytest.mark.serial),
                                     "v4l"])
def test_checkpoints_match_xla_states_interpret(variant):
  """The kernel's checkpoint states equal the XLA scan's state at each group boundary."""
  args = _inputs(1)
  _, ckpts = jax.jit(lambda *a: __import__("pallas_kernels.ttt_mlp.ttt_mlp", fromlist=["x"])
                     ._forward(*a, group=GROUP, ln_eps=1e-6, interpret=True,
                               variant=variant))(*args)
  assert ckpts[0].shape == (2, B, H, F, 4 * F)
  for g, m in enumerate((0, GROUP)):
    sl = lambda a: a[:, :, :m]
    if m == 0:
      want = tuple(jnp.broadcast_to(s, (B,) + s.shape) for s in args[6:])
    else:
      _, want = inner_loop.ttt_mlp_with_state(*(sl(a) for a in args[:4]), *args[4:],
                                             checkpoint_group_size=GROUP)
    for got, w in zip(ckpts, want):
      assert rel(got[g], w) < 1e-2, (g, rel(got[g], w))


def test_early_gelu_grad_moves_states_at_bf16_level_only_interpret():
  """v5 (gelu' kept as bf16 from the forward half) is really another code path than v4: its states
  differ from v4's, by bf16 rounding only (rel 1e-2: the tolerance of the other state tests)."""
  from pallas_kernels.ttt_mlp import ttt_mlp as T
  args = _inputs(1)
  ck = {v: jax.jit(lambda *a, v=v: T._forward(*a, group=1, ln_eps=1e-6, interpret=True,
                                                 variant=v))(*args)[1] for v in ("v4", "v5")}
  for i in (0, 1, 2, 3):  # W1, b1, W2, b2
    assert jnp.array_equal(ck["v4"][i][0], ck["v5"][i][0])  # the initial state
    assert rel(ck["v5"][i][1:], ck["v4"][i][1:]) < 1e-2, (i, rel(ck["v5"][i][1:], ck["v4"][i][1:]))
  assert not jnp.array_equal(ck["v4"][0], ck["v5"][0])  # W1's update takes G1 = (G2 W2^T) gelu'


@pytest.mark.serial  # two warpgroups in the interpreter: run alone (setup.cfg)
def test_two_warpgroups_are_race_free_interpret():
  """v6 (two warpgroups per CTA, hand-offs through SMEM and mbarriers) under the interpreter's
  happens-before race detector: no races over three steps with checkpoints at steps 0 and 2.
  (Dropping wg 0's wait for wg 1's update operands, sync[1], is reported as a race.) The v7
  kernels' race checks: test_ttt_mlp_ws_kernel.py (subprocesses with a time limit)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  from pallas_kernels.ttt_mlp import kernel_wg2_mgpu
  fn = kernel_wg2_mgpu.build_forward_wg2(
      B * H, NC, GROUP, 1e-6, config=kernel_wg2_mgpu.Wg2TuningConfig(cluster=1),
      interpret=plgpu.InterpretGPUParams(detect_races=True))
  races, out = races_in_forward_kernel(fn, _inputs(3))
  assert not races
  assert bool(jnp.isfinite(out.astype(jnp.float32)).all())


def test_role_split_config_is_validated():
  """Bad settings name the problem; variant=None is v7pefsgrbci compiled and v4 in interpret mode."""
  from pallas_kernels.ttt_mlp import kernel_ws_mgpu
  from pallas_kernels.ttt_mlp import ttt_mlp as T
  with pytest.raises(ValueError, match="cluster must be 1 or 2"):
    kernel_ws_mgpu.WsTuningConfig(cluster=4)
  with pytest.raises(ValueError, match="variant must be one of"):
    T.ttt_mlp_pallas(*_inputs(0), interpret=True, variant="v7x")
  assert T.default_variant(False) == "v7pefsgrbci" and T.default_variant(True) == "v4"
  cfg = kernel_ws_mgpu.WsTuningConfig.from_variant("v7pefsg", cluster=1)
  assert (cfg.prefetch_keys, cfg.early_gelu_grad, cfg.late_bias_sums, cfg.fresh_update,
          cfg.split_products, cfg.split_g1, cfg.cluster) == (True, True, False, True, True, True, 1)
  assert kernel_ws_mgpu.WsTuningConfig.from_variant("v7") == kernel_ws_mgpu.WsTuningConfig()
  for bad, message in (
      ("v7pa", "'v7' followed by letters"),
      ("v7peg", "split_g1 needs split_products"),
      ("v7pfb", "fused_bias_sums needs early_gelu_grad"),
      ("v7pec", "fused_b2_sum needs fused_bias_sums"),
      ("v7ek", "queries_ek needs prefetch_keys"),
      ("v7pefx", "x2_lo_smem needs split_products"),
      ("v7peu", "chunked_update needs fresh_update"),
      ("v7pefsgrbcio", "pipelined_store needs chunked_update"),
      ("v7pefsgbch", "ek_in_exchange needs reload_keys"),
      ("v7pefsgrbciz", "pipelined_z needs x2_lo_smem"),
      ("v7pefiw", "w2_smem needs split_products and fresh_update"),
      ("v7efsgrbciq", "lean_buffers needs prefetch_keys"),
      ("v7pefsgrbciwy", "w1_smem needs w2_smem, and lean_buffers"),
      ("v7pefsgrbij", "late_wait_q needs fused_b2_sum"),
  ):  # a letter unknown, or one without the letters it builds on
    with pytest.raises(ValueError, match=message):
      kernel_ws_mgpu.WsTuningConfig.from_variant(bad)
  assert kernel_ws_mgpu.WsTuningConfig.from_variant("v7pefsgrbciuo").pipelined_store
  assert kernel_ws_mgpu.WsTuningConfig.from_variant("v7pefsgrbcid").late_loads
  assert kernel_ws_mgpu.WsTuningConfig.from_variant("v7pefsgrbcih").ek_in_exchange
  assert kernel_ws_mgpu.WsTuningConfig.from_variant("v7pefsgrbciwy", cluster=1).w1_smem
  xu = kernel_ws_mgpu.WsTuningConfig.from_variant("v7pefsgrbcixu")
  assert (xu.x2_lo_smem, xu.chunked_update, xu.f32_state) == (True, True, True)
  with pytest.raises(ValueError, match="reduction_scratch is a v7 option"):
    T._build(1, 3, 2, 1e-6, True, "v4", reduction_scratch=4096)  # noqa: SLF001
  bc = kernel_ws_mgpu.WsTuningConfig.from_variant("v7pefsgrbc", reduction_scratch=2048)
  assert (bc.fused_bias_sums, bc.fused_b2_sum, bc.scratch_bytes) == (True, True, 3 * 2048)
  assert kernel_ws_mgpu.WsTuningConfig(reduction_scratch=2048).scratch_bytes == 2048
  assert kernel_ws_mgpu.WsTuningConfig.from_variant(
      "v7pefsgrbciw", reduction_scratch=2048).scratch_bytes == 2 * 2048


def test_prefetch_next_is_bitwise_v4_interpret():
  """v4p (step m+1's Q/K/V/eta loaded during step m) only moves loads: outputs and every
  checkpoint bitwise equal to v4's (interpret runs copies at issue time, so a load issued while
  its buffer is still read would change the results)."""
  from pallas_kernels.ttt_mlp import ttt_mlp as T
  args = _inputs(2)
  res = {v: jax.jit(lambda *a, v=v: T._forward_raw(*a, group=2, ln_eps=1e-6, interpret=True,
                                                   variant=v))(*args) for v in ("v4", "v4p")}
  assert jnp.array_equal(res["v4"][0], res["v4p"][0])
  for a, b in zip(res["v4"][1], res["v4p"][1]):
    assert jnp.array_equal(a, b)


def test_early_gelu_grad_needs_pipeline():
  """early_gelu_grad lives in the pipelined step only: other steps refuse it."""
  with pytest.raises(ValueError, match="early_gelu_grad"):
    kernel_acc_mgpu.AccTuningConfig(early_gelu_grad=True)
  kernel_acc_mgpu.AccTuningConfig(pipeline=True, early_gelu_grad=True)


def test_three_pass_trajectory_is_float32_accurate_interpret():
  """v3_3pass's states follow the float32 scan's far closer than v3's bf16-operand trajectory.

  The checkpoint before the last mini-batch (after NC - 1 kernel steps; stored as a (hi, lo) pair,
  ~16 mantissa bits) vs the XLA scan's state after the same steps.
  """
  from pallas_kernels.ttt_mlp import ttt_mlp as T
  args = _inputs(4)
  _, want = inner_loop.ttt_mlp_with_state(*(a[:, :, :NC - 1] for a in args[:4]), *args[4:],
                                          checkpoint_group_size=1)
  errs = {}
  for variant in ("v3", "v3_3pass"):
    _, ck = jax.jit(lambda *a, v=variant: T._forward(*a, group=1, ln_eps=1e-6, interpret=True,
                                                      variant=v))(*args)
    errs[variant] = max(rel(ck[i][NC - 1], want[i]) for i in (0, 2))  # W1, W2
  assert errs["v3_3pass"] < 1e-4 and errs["v3_3pass"] < errs["v3"] / 20, errs


def test_restart_without_outputs_keeps_states_interpret():
  """outputs=False (the backward's restart without its query half) gives bitwise the same states."""
  from pallas_kernels.ttt_mlp import ttt_mlp as T
  args = _inputs(3)
  kargs = T.kernel_args(*args, "v3")
  full, lean = (jax.jit(T._build(B * H, NC, 1, 1e-6, True, "v3", outputs=o))(*kargs)
                for o in (True, False))
  assert len(full) == len(lean) == 7
  for a, b in zip(full[1:], lean[1:]):
    assert jnp.array_equal(a, b)
  assert float(jnp.max(jnp.abs(full[1][:, 1:].astype(jnp.float32)
                               - full[1][:, :1].astype(jnp.float32)))) > 0  # the state moves


@pytest.mark.parametrize("backward", ["xla_vjp", "reference"])  # "pallas": test_ttt_mlp_bwd_kernel
def test_gradients_match_xla_scan_interpret(backward):
  """custom_vjp gradients (kernel forward + backward from checkpoints) vs jax.grad of the scan."""
  args = _inputs(2)
  cot = jax.random.normal(jax.random.PRNGKey(9), (B, H, NC, CS, F))

  def loss(impl, a):
    if impl == "pallas":
      o = ttt_mlp_pallas(*a, checkpoint_group_size=GROUP, interpret=True, backward=backward)
    else:
      o = inner_loop.ttt_mlp(*a, checkpoint_group_size=GROUP)
    return jnp.sum(o.astype(jnp.float32) * cot)

  g_ref = jax.grad(lambda a: loss("xla", a))(args)
  g = jax.grad(lambda a: loss("pallas", a))(args)
  names = ("XQ", "XK", "XV", "eta", "ln_weight", "ln_bias", "W1", "b1", "W2", "b2")
  for name, x, y in zip(names, g, g_ref):
    assert x.shape == y.shape, name
    err = rel(x, y)
    assert err < 2e-2, (name, err)


@pytest.mark.parametrize("variant", ["v2", "v3_cluster2", "v4_cluster2", "v5_cluster2",
                                     "v4p_cluster2", "v3_3pass_cluster2", "v3_saves_cluster2",
                                     "v3_restart_ln_cluster2", "v6_cluster2", "v4l_cluster2",
                                     "v7_cluster2", "v7pe_cluster2", "v7pef_cluster2", "v7pefs_cluster2",
                                     "v7pefsg_cluster2", "v7pefsgr_cluster2", "v7pefsgrb_cluster2",
                                     "v7pefsgrbc_cluster2", "v7pefsgrbk_cluster2",
                                     "v7pefsgrbci_cluster2", "v7pefsgrbcixu_cluster2",
                                     "v7pefsgrbcixuo_cluster2", "v7pefsgrbcidxuo_cluster2",
                                     "v7pefsgrbcidhxuo_cluster2", "v7pefsgrbcidhxzuo_cluster2",
                                     "v7pefsgrbciw_cluster2", "v7pefsgrbcidhxzuow_cluster2",
                                     "v7pefsgrbciq_cluster2", "v7pefsgrbcidhxzuoqwy_cluster2",
                                     "v7pefsgrbcidhjxzuoqwy_cluster2",
                                     "v7pefsgrbcidhjtxzuoqwy_cluster2",
                                     "v3_3passf_cluster2"])
def test_kernel_lowers_for_cuda(variant):
  """The compiled (non-interpret) kernel lowers to a Mosaic GPU module for CUDA on this CPU box.

  v3 at cluster 2 (DSMEM exchange, state accumulated in place) cannot run in interpret mode: this
  lowering, and the GPU benchmark run, are all it gets before the device.
  """
  bh, nc, g = 4, 40, 16
  if variant == "v2":
    fn = kernel_mgpu.build_forward(bh, nc, g, 1e-6)
  elif variant == "v6_cluster2":  # two warpgroups per CTA
    from pallas_kernels.ttt_mlp import kernel_wg2_mgpu
    fn = kernel_wg2_mgpu.build_forward_wg2(bh, nc, g, 1e-6)
  elif variant.startswith("v7"):  # two warpgroups by role, each with its own exchange slot
    from pallas_kernels.ttt_mlp import kernel_ws_mgpu
    fn = kernel_ws_mgpu.build_forward_ws(
        bh, nc, g, 1e-6, config=kernel_ws_mgpu.WsTuningConfig.from_variant(
            variant.removesuffix("_cluster2")))
  else:
    cfg = kernel_acc_mgpu.AccTuningConfig(
        cluster=2, pipeline=variant in ("v4_cluster2", "v5_cluster2", "v4p_cluster2",
                                        "v4l_cluster2"),
        late_bias_sums=variant == "v4l_cluster2",
        prefetch_next=variant == "v4p_cluster2",
        three_pass=variant.startswith("v3_3pass"), fresh_update=variant == "v3_3passf_cluster2",
        early_gelu_grad=variant == "v5_cluster2",
        save_activations=variant in ("v3_saves_cluster2", "v3_restart_ln_cluster2"),
        outputs=variant != "v3_restart_ln_cluster2",
        checkpoint_lo=variant != "v3_restart_ln_cluster2",
        save_ln=variant == "v3_restart_ln_cluster2")
    fn = kernel_acc_mgpu.build_forward_acc(bh, nc, g, 1e-6, config=cfg)
  S = jax.ShapeDtypeStruct
  bf, f32 = jnp.bfloat16, jnp.float32
  args = (S((bh, nc, 64, 64), bf),) * 3 + (S((bh, nc, 64), f32), S((bh, 64), f32),
                                            S((bh, 64), f32), S((bh, 4, 64, 64), bf),
                                            S((bh, 4, 64, 64), bf), S((bh, 4, 64), f32),
                                            S((bh, 4, 64, 64), bf), S((bh, 4, 64, 64), bf),
                                            S((bh, 64), f32))
  if variant.startswith("v7pefsgrbci"):  # the float32 state of 2 heads, as it is
    h = 2
    args = args[:4] + (S((h, 64), f32), S((h, 64), f32), S((h, 64, 256), f32),
                       S((h, 4, 64), f32), S((h, 4, 64, 64), f32), S((h, 64), f32))
  lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert "mosaic_gpu" in text.lower()
  outs = jax.eval_shape(fn, *args)
  assert outs[0].shape == (bh, nc, 64, 64) and outs[1].shape == (bh, 3, 4, 64, 64)
  if variant == "v3_saves_cluster2":  # keys' X2 chunks, Z2; queries' X2 chunks, Z2 per step
    assert [o.shape for o in outs[7:]] == [(bh, nc, 4, 64, 64), (bh, nc, 64, 64)] * 2
  if variant == "v3_restart_ln_cluster2":  # keys' X2 chunks, G2, xhat, h, rstd per step
    assert [o.shape for o in outs[7:]] == ([(bh, nc, 4, 64, 64)] + [(bh, nc, 64, 64)] * 3
                                           + [(bh, nc, 64)])


def test_kernel_without_checkpoints_lowers_for_cuda():
  """The default forward kernel with `checkpoints=False` (the primal call's) lowers for CUDA at
  cluster 2 and returns the output alone; other variants refuse the option by name."""
  from pallas_kernels.ttt_mlp import kernel_ws_mgpu
  from pallas_kernels.ttt_mlp import ttt_mlp as T
  bh, nc, h = 4, 40, 2
  fn = T._build(bh, nc, 16, 1e-6, False, T.DEFAULT_VARIANT, checkpoints=False)
  S, bf, f32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float32
  args = (S((bh, nc, 64, 64), bf),) * 3 + (S((bh, nc, 64), f32), S((h, 64), f32), S((h, 64), f32),
                                            S((h, 64, 256), f32), S((h, 4, 64), f32),
                                            S((h, 4, 64, 64), f32), S((h, 64), f32))
  assert kernel_ws_mgpu.WsTuningConfig.from_variant(T.DEFAULT_VARIANT).f32_state
  assert "mosaic_gpu" in jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  outs = jax.eval_shape(fn, *args)
  assert len(outs) == 1 and outs[0].shape == (bh, nc, 64, 64)
  with pytest.raises(ValueError, match="checkpoints=False is a v7 forward option"):
    T._build(bh, nc, 16, 1e-6, True, "v4", checkpoints=False)


def test_unsupported_shape_falls_back_to_xla():
  """F = 32 is not a kernel shape: the XLA scan runs (same numbers), never a wrong kernel."""
  ks = jax.random.split(jax.random.PRNGKey(3), 6)
  f, cs, nc = 32, 8, 3
  x = lambda k: jax.random.normal(k, (1, 2, nc, cs, f))
  args = (x(ks[0]), x(ks[1]), x(ks[2]), 0.01 * jnp.ones((1, 2, nc, cs)), jnp.ones((2, f)),
          jnp.zeros((2, f)), 0.05 * jax.random.normal(ks[3], (2, f, 4 * f)),
          jnp.zeros((2, 1, 4 * f)), 0.05 * jax.random.normal(ks[4], (2, 4 * f, f)),
          jnp.zeros((2, 1, f)))
  assert kernel_mgpu is not None
  from pallas_kernels.ttt_mlp import kernel_supported
  assert kernel_supported(args[0], args[6]) is not None
  out = ttt_mlp_pallas(*args, checkpoint_group_size=2)
  ref = inner_loop.ttt_mlp(*args, checkpoint_group_size=2)
  assert jnp.array_equal(out, ref)
  # Through the public switch too.
  out2 = inner_loop.ttt_mlp(*args, checkpoint_group_size=2, implementation="pallas")
  assert jnp.array_equal(out2, ref)
