"""The kernel files' `main()`s (`pallas_kernels.kernel_bench`) in Mosaic GPU interpret mode.

Each main times its kernel against the reference beside it and returns the largest relative
difference; here, at tiny shapes on the CPU, that difference must be at bf16 level, and a
reference that is off (a sabotaged scan) must show up in it.
"""

import pytest

from pallas_kernels import kernel_bench
from pallas_kernels.ttt_linear import kernel_mgpu as linear_kernel
from pallas_kernels.ttt_mlp import kernel_qrev_mgpu
from ttt_dit.ttt import inner_loop

SMALL = ["--interpret", "--reps", "1", "--nc", "3", "--heads", "1"]


def test_linear_forward_main(capsys):
  diffs = linear_kernel.main(SMALL + ["--variants", "primal,dual"])
  assert set(diffs) == {"primal", "dual"}
  assert all(d < 1e-2 for d in diffs.values()), diffs
  out = capsys.readouterr().out
  assert "TTT-Linear forward primal, H=1, NC=3" in out and "max rel diff" in out


def test_forward_main_sees_a_wrong_reference(monkeypatch):
  scan = inner_loop.ttt_linear
  monkeypatch.setattr(inner_loop, "ttt_linear",
                      lambda *x, **kw: scan(*x, **kw) * 1.05)  # 5% off: must be reported
  diffs = kernel_bench.forward_main(SMALL, "", ("primal",), layer="linear")
  assert diffs["primal"] > 1e-2, diffs


def test_query_reverse_main():
  diffs = kernel_qrev_mgpu.main(["--interpret", "--reps", "1", "--heads", "1", "--groups", "1",
                                 "--group", "2"])
  assert diffs["kernel"] < 1e-4, diffs


def test_unknown_variant_is_named(capsys):
  with pytest.raises(SystemExit):
    linear_kernel.main(SMALL + ["--variants", "primal,fast"])
  assert "unknown variants ['fast']" in capsys.readouterr().err
