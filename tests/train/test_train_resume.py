"""Exact resume after SIGKILL between checkpoints, and stage chaining (params only from another run)."""

import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runs import BASE, REPO, env, launch, launch_cmd, losses  # noqa: E402
from tiny_data import write_dataset  # noqa: E402

ARGS = (*BASE, "--config.checkpoint.every=10", "--config.ttt_diagnostics_every=0")  # 40 steps


def test_sigkill_resume_is_exact_and_chaining(tmp_path):
  index = write_dataset(str(tmp_path / "data"), n=3)
  ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
  launch(ref, index, *ARGS)
  proc = subprocess.Popen(launch_cmd(killed, index, *ARGS), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  metrics = os.path.join(killed, "metrics.jsonl")
  while time.time() < deadline:  # kill once step 11 is logged (checkpoint 10 under way, 20 not yet)
    if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 12:
      break
    time.sleep(0.02)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  steps_done = sorted(losses(killed))
  assert 12 <= len(steps_done) < 40, steps_done
  launch(killed, index, *ARGS)
  a, b = losses(ref), losses(killed)
  assert sorted(a) == sorted(b) == list(range(40))
  for s in range(40):
    assert abs(a[s] - b[s]) <= 1e-6 * max(1.0, abs(a[s])), (s, a[s], b[s])
  # Stage chaining: a run initialised from ref's checkpoints starts from its params with a fresh optimizer
  # and step counter (it trains all 40 steps itself).
  chained = str(tmp_path / "chained")
  launch(chained, index, *ARGS, f"--config.init_checkpoint={ref}/checkpoints")
  c = losses(chained)
  assert sorted(c) == list(range(40))  # step not inherited: starts at 0
  # Same seed, batch and noise as ref's step 0, but trained params: a clearly lower loss.
  assert c[0] < 0.9 * a[0], (c[0], a[0])
