"""Exact resume after SIGKILL between checkpoints, and stage chaining (params only from another run)."""

import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train_launcher import REPO, launch, losses  # noqa: E402
from tiny_data import write_dataset  # noqa: E402

ARGS = ("--config.optimizer.total_steps=12", "--config.checkpoint.every=4")


def test_sigkill_resume_is_exact_and_chaining(tmp_path):
  index = write_dataset(str(tmp_path / "data"), n=3)
  ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
  launch(ref, index, *ARGS)
  cmd = [sys.executable, "-m", "experiments.train", "--config=experiments/configs/stage.py:tiny_3s",
         f"--workdir={killed}", f"--config.data.index={index}", *ARGS]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  metrics = os.path.join(killed, "metrics.jsonl")
  while time.time() < deadline:  # kill once step 5 is logged (checkpoint 4 exists, 8 not yet)
    if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 6:
      break
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  steps_done = sorted(losses(killed))
  assert 6 <= len(steps_done) < 12, steps_done
  launch(killed, index, *ARGS)
  a, b = losses(ref), losses(killed)
  assert sorted(a) == sorted(b) == list(range(12))
  for s in range(12):
    assert abs(a[s] - b[s]) <= 1e-6 * max(1.0, abs(a[s])), (s, a[s], b[s])
  # Stage chaining: a 9 s-style run initialised from ref's checkpoints starts from its params, fresh optimizer.
  chained = str(tmp_path / "chained")
  launch(chained, index, "--config.optimizer.total_steps=1", f"--config.init_checkpoint={ref}/checkpoints")
  # Same seed, batch and noise as ref's step 0, but trained params: a clearly lower loss.
  assert losses(chained)[0] < 0.9 * a[0], (losses(chained)[0], a[0])
  assert not os.path.exists(os.path.join(chained, "checkpoints", "12"))  # optimizer/step not inherited
