"""CPU checks of `benchmarks/ttt_mlp_variants.py` (the GPU A/B of forward kernel variants): its
bitwise comparison must tell equal results from different ones, and bad variant names fail."""

from __future__ import annotations

import pytest

from benchmarks import ttt_mlp_variants as V


def test_parse_variant():
  assert V.parse_variant("v7pefsgr") == ("v7pefsgr", None, True)
  assert V.parse_variant("v7pefsgrbc@4096") == ("v7pefsgrbc", 4096, True)
  assert V.parse_variant("v7pefsgrbci:lean") == ("v7pefsgrbci", None, False)
  with pytest.raises(SystemExit, match="v7 variants only"):
    V.parse_variant("v4:lean")
  with pytest.raises(SystemExit, match="not one of"):
    V.parse_variant("v9")
  with pytest.raises(SystemExit, match="byte count"):
    V.parse_variant("v4@4096")  # (reduction scratch is a v7 option)
  with pytest.raises(SystemExit, match="byte count"):
    V.parse_variant("v7pefsgr@lots")


def test_bitwise_report_in_interpret_mode():
  """v4 against itself is bitwise; v3, another kernel (its results differ from v4's by ~3e-3 in
  interpret mode), is not, and its difference is reported."""
  rows = V.main(["--nc", "3", "--heads", "1", "--variants", "v4,v4,v3", "--interpret",
                 "--rounds", "1", "--reps", "1", "--in_flight", "1"])
  assert [r["variant"] for r in rows] == ["v4", "v4", "v3"]
  assert rows[1]["bitwise"] and rows[1]["max_rel"] == 0.0
  assert not rows[2]["bitwise"] and 0.0 < rows[2]["max_rel"] < 1e-1
  assert all(r["fwd_ms"] > 0 and r["fwd_ms_polled"] > 0 and r["fwd_ms_in_flight"] > 0
             for r in rows)


def test_a_failing_variant_is_reported_not_fatal(monkeypatch):
  """A variant that raises gets an error row and no timing; the others are timed; a failing
  baseline stops the run."""
  real = V.T._forward_raw

  def forward_raw(*args, variant, **kw):
    if variant == "v3":
      raise ValueError("Mosaic GPU kernel exceeds available shared memory: (simulated)")
    return real(*args, variant=variant, **kw)
  monkeypatch.setattr(V.T, "_forward_raw", forward_raw)
  flags = ["--nc", "3", "--heads", "1", "--interpret", "--rounds", "1", "--reps", "1",
           "--in_flight", "1"]
  rows = V.main(flags + ["--variants", "v4,v3,v4"])
  assert [r["variant"] for r in rows] == ["v4", "v3", "v4"]
  assert "shared memory" in rows[1]["error"] and "fwd_ms" not in rows[1]
  assert rows[2]["bitwise"] and rows[0]["fwd_ms"] > 0 and rows[2]["fwd_ms"] > 0
  with pytest.raises(ValueError, match="shared memory"):
    V.main(flags + ["--variants", "v3,v4"])
