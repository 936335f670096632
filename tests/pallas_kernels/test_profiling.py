"""CPU tests of the kernel profiling helpers (`mgpu_common.Profile`/`Phases`) and of the trace
reading in `benchmarks/ttt_mlp_profile.py` (the profiled kernels themselves run only on a GPU)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks import ttt_mlp_profile
from pallas_kernels import mgpu_common


def test_profile_and_compiler_params():
  """Profile needs a directory; compiler_params turns the profiler on only when given one, with
  bounds checking (a full buffer drops events instead of corrupting SMEM)."""
  with pytest.raises(ValueError, match="directory"):
    mgpu_common.Profile("")
  with pytest.raises(ValueError, match="space"):
    mgpu_common.Profile("/x", space=0)
  plain = mgpu_common.compiler_params(True)
  assert plain.profile_space == 0 and plain.approx_math
  assert plain.reduction_scratch_bytes == mgpu_common.DEFAULT_REDUCTION_SCRATCH
  prof = mgpu_common.compiler_params(False, mgpu_common.Profile("/x", space=7), 4096)
  assert (prof.profile_space, prof.profile_dir, prof.profile_bounds_check) == (7, "/x", True)
  assert prof.reduction_scratch_bytes == 4096


def test_phases_name_consecutive_regions():
  """Phases opens one named scope at a time: each op carries exactly the phase it was traced in."""
  def f(x):
    ph = mgpu_common.Phases()
    ph("first")
    y = jnp.sin(x)
    ph("second")
    z = jnp.cos(y)
    ph.close()
    return jnp.exp(z)

  eqns = jax.make_jaxpr(f)(1.0).eqns
  stacks = [str(e.source_info.name_stack) for e in eqns]
  assert stacks == ["first", "second", ""], stacks


def test_phase_cycles_from_a_trace(tmp_path):
  """Durations per phase from begin/end pairs of every (SM, warpgroup) trace, in cycles (the
  profiler's ts is (start ns + cycles) / 1e3), and per phase the number of traces that run it
  (v7's warpgroups run different phases: a phase's time per step is over those traces only)."""
  ev = lambda name, ph, ts, tid: {"name": name, "ph": ph, "ts": ts, "pid": 1, "tid": tid}
  trace = {"traceEvents": [ev("load", "B", 1.0, 1), ev("load", "E", 1.5, 1),
                           ev("mm", "B", 1.5, 1), ev("mm", "E", 3.5, 1),
                           ev("load", "B", 2.0, 2), ev("load", "E", 2.25, 2)]}
  (tmp_path / "1-trace.json").write_text(json.dumps({"traceEvents": []}))
  (tmp_path / "2-trace.json").write_text(json.dumps(trace))
  cycles, n = ttt_mlp_profile.phase_cycles(ttt_mlp_profile.latest_trace(str(tmp_path)))
  assert n == {"load": 2, "mm": 1}
  assert cycles == {"load": [500.0, 250.0], "mm": [2000.0]}
  rows = ttt_mlp_profile.report("t", cycles, n, steps=1, ghz=1.0, wall_us=0.0)
  assert rows["mm"]["us_per_step"] == pytest.approx(2.0)  # 2000 cycles on 1 trace, 1 GHz
  assert rows["load"]["us_per_step"] == pytest.approx(0.375)  # 750 cycles over 2 traces
  with pytest.raises(FileNotFoundError, match="trace"):
    ttt_mlp_profile.latest_trace(str(tmp_path / "missing"))
