"""A tiny DiT overfits a tiny official-format dataset through the real absl launcher (subprocess)."""

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_data import write_dataset  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def launch(workdir, index, *extra, check=True):
  """Runs `python -m experiments.train` on the tiny 3 s config; returns the CompletedProcess."""
  cmd = [sys.executable, "-m", "experiments.train", "--config=experiments/configs/stage.py:tiny_3s",
         f"--workdir={workdir}", f"--config.data.index={index}", *extra]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=check, timeout=300)


def losses(workdir):
  """{step: loss} from metrics.jsonl (the latest line per step)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {m["step"]: m["loss"] for m in map(json.loads, f)}


def test_tiny_overfits_through_launcher(tmp_path):
  index = write_dataset(str(tmp_path / "data"), n=1)
  run = str(tmp_path / "run")
  launch(run, index, "--config.optimizer.total_steps=40", "--config.optimizer.lr=3e-3",
         "--config.optimizer.lr_ssm=3e-3", "--config.optimizer.lr_end=3e-3", "--config.checkpoint.every=20")
  l = losses(run)
  assert sorted(l) == list(range(40))
  first, last = sum(l[s] for s in range(5)) / 5, sum(l[s] for s in range(35, 40)) / 5
  assert last < 0.6 * first, (first, last)  # stated factor: mean loss drops by >= 40% in 40 steps
  assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["20", "40"]
