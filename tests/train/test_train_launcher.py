"""Through the real absl launcher (subprocess): a tiny DiT overfits a tiny official-format dataset and writes
its metrics (JSONL + TensorBoard); a NaN batch stops a run with a clear message, keeping the last good
checkpoint."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runs import BASE, event_scalars, launch, losses, metrics  # noqa: E402
from tiny_data import write_dataset  # noqa: E402

TAGS = ("loss", "grad_norm", "lr/ssm", "lr/other", "step_time_s", "tokens_per_s", "skipped_samples",
        "gate/layers.0/forward_text", "gate/layers.0/forward_video", "gate/layers.0/backward_text",
        "gate/layers.0/backward_video", "ttt/layers.0/forward/loss_before", "ttt/layers.0/forward/loss_after",
        "ttt/layers.0/reverse/loss_before", "ttt/layers.0/reverse/update_norm")


def test_tiny_overfits_through_launcher_with_metrics(tmp_path):
  index = write_dataset(str(tmp_path / "data"), n=1)
  run = str(tmp_path / "run")
  launch(run, index, *BASE, "--config.checkpoint.every=20", "--config.ttt_diagnostics_every=20")
  l = losses(run)
  assert sorted(l) == list(range(40))
  first, last = sum(l[s] for s in range(5)) / 5, sum(l[s] for s in range(35, 40)) / 5
  assert last < 0.6 * first, (first, last)  # stated factor: mean loss drops by >= 40% in 40 steps
  assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["20", "40"]
  # TensorBoard event file: every scalar tag; per-step tags at every step, TTT diagnostics at 0, 20, 39.
  tb = event_scalars(os.path.join(run, "tensorboard"))
  for tag in TAGS:
    assert tag in tb, (tag, sorted(tb))
  assert sorted(tb["loss"]) == list(range(40)) and sorted(tb["ttt/layers.0/forward/loss_before"]) == [0, 20, 39]
  m = metrics(run)
  np.testing.assert_allclose([tb["loss"][s] for s in range(40)], [l[s] for s in range(40)], rtol=1e-6)
  assert 0.0 < m[0]["gate/layers.0/forward_text"] < 0.11  # tanh(alpha), alpha initialised at 0.1
  assert m[0]["lr/ssm"] == m[0]["lr/other"] and m[0]["tokens_per_s"] > 0
  assert all(np.isfinite(v) and v >= 0 for k, v in m[20].items() if k.startswith("ttt/"))


def test_nan_batch_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
  index = write_dataset(str(tmp_path / "data"), n=2)
  run = str(tmp_path / "run")
  r = launch(run, index, *BASE, "--config.checkpoint.every=2", "--config.ttt_diagnostics_every=0",
             "--config.debug.nan_step=3", check=False)
  assert r.returncode != 0
  assert "FloatingPointError: step 3: non-finite loss and gradients (loss nan" in r.stderr, r.stderr[-3000:]
  assert "last good checkpoint: step 2" in r.stderr
  assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["2"]  # no checkpoint of the bad state
  assert sorted(losses(run)) == [0, 1, 2]
