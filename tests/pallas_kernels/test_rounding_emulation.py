"""The rounding emulations behind NOTES-ttt-*.md's accuracy findings (`benchmarks.ttt_mlp_rounding`,
`benchmarks.ttt_linear_rounding`): unrounded, each is the XLA scan's own step; rounded, each
rounds what its mode names and nothing else; the script runs end to end at tiny shapes."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks import ttt_linear_rounding, ttt_mlp_rounding
from kernel_testing import rel, ttt_inputs
from ttt_dit.ttt import inner_loop


def _step_inputs(hidden):
  """One mini-batch's (state [B, H, ...], xs) from `ttt_inputs` at B=1, H=2, eta ~1e-2."""
  XQ, XK, XV, eta, lw, lb, *state = ttt_inputs(1, 2, 1, 3, hidden=hidden, w_scale=0.1)
  state = tuple(s[None] for s in state)
  return state, (XK[:, :, 0], XV[:, :, 0], eta[:, :, 0], lw[:, None, :], lb[:, None, :]), XQ[:, :, 0]


def test_linear_emulation_unrounded_is_the_scan_step():
  """mode none = inner_loop._linear_step's new state (float32: ~1e-7); every rounded mode moves
  the state, and split_z's K W1 moves Z1 ~2^8 times less than only_z's (W1's (hi, lo) pair)."""
  state, xs, XQ = _step_inputs(None)
  want, _ = inner_loop._linear_step(state, (XQ,) + xs, ln_eps=1e-6, diagnostics=False)  # noqa: SLF001
  got = ttt_linear_rounding.emulated_update(state, xs, "none", 1e-6)
  assert all(rel(g, w) < 1e-5 for g, w in zip(got, want))
  d = lambda m: rel(ttt_linear_rounding.emulated_update(state, xs, m, 1e-6)[0] - state[0],
                    want[0] - state[0])  # the update's error
  assert d("only_z") > 1e-4 and d("only_dw") > 1e-4 and d("all") > 1e-4
  assert d("split_z") == pytest.approx(d("only_dw"), rel=0.1)  # the pair leaves the update's error
  assert d("split_z") < d("all")
  with pytest.raises(ValueError, match="mode 'bogus'"):
    ttt_linear_rounding.emulated_update(state, xs, "bogus", 1e-6)


def test_mlp_emulation_unrounded_is_the_scan_step():
  """mode none = inner_loop._mlp_step's new state; all / split_zg round (and split_zg less)."""
  state, xs, XQ = _step_inputs(256)
  want, _ = inner_loop._mlp_step(state, (XQ,) + xs, ln_eps=1e-6, diagnostics=False)  # noqa: SLF001
  got = ttt_mlp_rounding.emulated_update(state, xs, "none", 1e-6)
  assert all(rel(g, w) < 1e-5 for g, w in zip(got, want))
  d = lambda m: rel(ttt_mlp_rounding.emulated_update(state, xs, m, 1e-6)[0] - state[0],
                    want[0] - state[0])
  assert d("all") > 1e-4 and 0 < d("split_zg") < d("all")


def test_linear_rounding_script_runs(capsys):
  """NC=3, H=2: mode none's gradients are the float32 scan's (float32 roundoff), all's are not."""
  ttt_linear_rounding.main(["--nc", "3", "--heads", "2", "--group", "2", "--eta_scale", "1e-2",
                            "--modes", "none,all"])
  lines = {l.split("mode=")[1].split(":")[0]: float(l.split("max grad rel L2 ")[1].split()[0])
           for l in capsys.readouterr().out.splitlines() if "mode=" in l}
  assert lines["none"] < 1e-5 < lines["all"], lines
