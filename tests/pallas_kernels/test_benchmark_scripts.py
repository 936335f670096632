"""`benchmarks/ttt_mlp_kernel.py` on the CPU at tiny shapes: its per-head error bookkeeping and the
reference's self-sensitivity report (`--grad_sensitivity`), which the GPU figures rely on."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import kernel_common, ttt_linear_kernel, ttt_mlp_kernel


def test_rel_on_heads_picks_the_head_axis():
  y = jax.random.normal(jax.random.PRNGKey(0), (1, 3, 2, 4, 4))  # [B, H, NC, CS, F]
  x = y.at[:, 2].multiply(2.0)  # only head 2 is off, by 100%
  assert kernel_common.rel_on_heads(x, y, np.array([0, 1]), "XK") == 0.0
  assert kernel_common.rel_on_heads(x, y, np.array([2]), "XK") == pytest.approx(1.0, rel=1e-6)
  w = y[0, :, 0]  # [H, CS, F]: a state-shaped gradient, heads on axis 0
  assert kernel_common.rel_on_heads(w.at[1].add(w[1]), w, np.array([0, 2]), "W1") == 0.0
  assert kernel_common.rel_on_heads(w.at[1].add(w[1]), w, np.array([1]), "W1") == pytest.approx(1.0)


def test_grad_sensitivity_report(tmp_path, capsys):
  out = tmp_path / "rows.json"
  ttt_mlp_kernel.main(["--nc", "2", "--heads", "2", "--impls", "xla", "--grad_nc", "2",
                       "--reps", "1", "--in_flight", "1", "--grad_sensitivity", "1.2e-7",
                       "--ref_repeat", "--out", str(out)])
  lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
  sens = next(l for l in lines if "ref_grad_sensitivity" in l and "ref_repeat" not in l)
  repeat = next(l for l in lines if l.get("ref_repeat"))
  assert repeat["ref_grad_sensitivity"] == 0.0 and repeat["xk_per_head_max"] == 0.0, repeat  # CPU
  # one float32 ulp of W1 moves a 2-step scan's gradients by float32 rounding, not more
  assert 0 < sens["xk_per_head_max"] < 1e-5 and sens["conditioned_heads"] == 2, sens
  row = next(l for l in lines if l.get("impl") == "xla")
  assert row["conditioned_heads"] == 2
  # over all heads, the conditioned-heads errors are the global ones
  assert row["grad_rel_conditioned"] == pytest.approx(row["grad_rel"], rel=1e-5)
  assert out.exists()


def test_ttt_linear_grad_sensitivity_report(capsys):
  """The TTT-Linear benchmark's reference self-check (the kernels in interpret mode, tiny sizes)."""
  ttt_linear_kernel.main(["--nc", "2", "--heads", "1", "--impls", "xla", "--grad_impls", "xla",
                          "--grad_nc", "2", "--eta_scales", "1e-5", "--reps", "1", "--group", "2",
                          "--grad_sensitivity", "1.2e-7", "--conditioned_below", "0"])
  lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
  sens = next(l for l in lines if "ref_grad_sensitivity" in l)
  assert 0 < sens["xk_per_head_max"] < 1e-5 and sens["conditioned_heads"] == 0, sens
  row = next(l for l in lines if l.get("impl") == "xla")
  assert row["conditioned_heads"] == 0 and "grad_rel_conditioned" not in row  # no heads: no figure
  assert set(row["xk_per_head_worst"]) == {"0"}


def test_host_trace_call_phases():
  """`host_trace.call_phases` on three synthetic waited calls (ns), dispatched at 0, 10_000 and
  20_000 (a nested PjitFunction inside each), PjRt's execute ending 3_000 after dispatch, kernels
  at +4_000..+8_000 (two per call); the third call only bounds the second."""
  from benchmarks import host_trace
  ev = lambda name, s, d: ("python3", name, float(s), float(d))
  events, device = [], []
  for t0 in (0, 10_000, 20_000):
    events += [ev("PjitFunction(f)", t0, 5_000), ev("PjitFunction(f)", t0 + 100, 4_000),
               ev("PjRtCApiLoadedExecutable::Execute", t0 + 1_000, 2_000)]
    device += [(float(t0 + 4_000), 1_000.0), (float(t0 + 6_000), 2_000.0)]
  phases = host_trace.call_phases(sorted(events, key=lambda e: e[2]), device)
  assert phases == {"enqueue": 3.0, "to_first_kernel": 4.0, "after_enqueue": 1.0, "device": 4.0,
                    "to_next_call": 2.0}


def test_median_ms_waits_by_polling():
  """wait="poll" spins on is_ready() until every output is ready (the result is complete when
  timed), and a bad wait mode names itself."""
  from pallas_kernels import kernel_bench
  fn = jax.jit(lambda x: (x @ x, x + 1))
  x = jnp.ones((256, 256))
  assert kernel_bench.median_ms(fn, (x,), 3, wait="poll") > 0
  out = fn(x)
  kernel_bench.wait_polling(out)
  assert all(a.is_ready() for a in jax.tree.leaves(out))
  with pytest.raises(ValueError, match="wait must be"):
    kernel_bench.median_ms(fn, (x,), 1, wait="spin")


def test_sass_summary_places_spills_between_landmarks(tmp_path, capsys):
  """`benchmarks.sass_summary` reads an nvdisasm listing: kernels by name, opcodes classed by
  their longest prefix (predicated ones too), and segments opened by landmarks with their spills."""
  from benchmarks import sass_summary
  sass = """\t.section\t.text.mosaic_gpu_kernel,"ax",@progbits
.text.mosaic_gpu_kernel:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0020*/                   STL.64 [R1+0x10], R24 ;
        /*0030*/                   FADD R2, R3, R4 ;
        /*0040*/                   MUFU.TANH R5, R6 ;
        /*0050*/               @!P0 LDL R7, [R1+0x10] ;
        /*0060*/                   LDL.64 R8, [R1+0x18] ;
        /*0070*/                   BAR.SYNC.DEFER_BLOCKING 0x1, 0x80 ;
        /*0080*/                   FMUL R2, R3, R4 ;
"""
  log = tmp_path / "sass.txt"
  log.write_text(sass)
  kernels = sass_summary.parse(sass.splitlines())
  (name, insns), = kernels.items()
  assert name.startswith("mosaic_gpu_kernel") and len(insns) == 9
  assert [c for _, _, c in insns][1:7] == ["wgmma", "STL", "other", "tanh", "LDL", "LDL"]
  segs = sass_summary.segments(insns)
  assert [(a, c, s["STL"], s["LDL"]) for a, c, s in segs] == [
      (0, "start", 0, 0), (0x10, "wgmma", 1, 0), (0x40, "tanh", 0, 2), (0x70, "bar", 0, 0)]
  sass_summary.main([str(log)])
  out = capsys.readouterr().out
  assert "STL 1, LDL 2" in out and "0x00010      wgmma" in out and "bar" not in out.split("\n", 2)[2]


def test_sass_summary_finds_step_loops_not_wait_stubs():
  """A branch back to a label before the first EXIT is a loop (its spills counted); the
  out-of-line mbarrier retries after the EXIT jump back too, and are not loops."""
  from benchmarks import sass_summary
  sass = """.text.k:
        /*0000*/                   MOV R1, RZ ;
.L_x_1:
        /*0010*/                   LDL R2, [R1] ;
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0030*/                   STL [R1], R2 ;
        /*0040*/               @P0 BRA `(.L_x_1) ;
.L_x_2:
        /*0050*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [R0+URZ], R3 ;
        /*0060*/               @P0 EXIT ;
.L_x_3:
        /*0070*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [R0+URZ], R3 ;
        /*0080*/                   BRA `(.L_x_2) ;
"""
  loops = {}
  (name, insns), = sass_summary.parse(sass.splitlines(), loops).items()
  assert loops[name] == [(0x10, 0x40)]
  (line,) = sass_summary.loop_report(insns, loops[name], min_len=1)
  assert "0x00010-0x00040: 4 instructions, STL 1, LDL 1, wgmma 1" in line
