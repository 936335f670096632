"""Helpers shared by the subprocess training tests: the launcher command, a JAX compilation cache, losses."""

import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# One persistent XLA cache for every training subprocess (same HLO -> compiled once per machine).
JAX_CACHE = os.path.join(tempfile.gettempdir(), "ttt_dit_tests_jax_cache")
# A 1-layer tiny DiT: every parameter kind of the full model, half the tracing/compile time of 2 layers.
SMALL = ("--config.model.overrides.num_layers=1",)


def env(devices: int = 1) -> dict[str, str]:
  """Subprocess environment: CPU, `devices` fake devices, the shared compilation cache."""
  # Backend optimisation level 0: about half the CPU compile time of these tiny programs; every run a
  # test compares is compiled with the same flags.
  flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags,
              JAX_COMPILATION_CACHE_DIR=JAX_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def launch_cmd(workdir: str, index: str, *extra: str) -> list[str]:
  """`python -m experiments.train` on the tiny 3 s config."""
  return [sys.executable, "-m", "experiments.train", "--config=experiments/configs/stage.py:tiny_3s",
          f"--workdir={workdir}", f"--config.data.index={index}", *extra]


def launch(workdir: str, index: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
  """Runs the launcher to completion; returns the CompletedProcess (stderr shown on failure)."""
  r = subprocess.run(launch_cmd(workdir, index, *extra), cwd=REPO, env=env(), capture_output=True, text=True,
                     timeout=300)
  if check:
    assert r.returncode == 0, r.stderr[-4000:]
  return r


def metrics(workdir: str) -> dict[int, dict]:
  """{step: metrics} from metrics.jsonl (the latest line per step)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {m["step"]: m for m in map(json.loads, f)}


def losses(workdir: str) -> dict[int, float]:
  """{step: loss} from metrics.jsonl."""
  return {s: m["loss"] for s, m in metrics(workdir).items()}

# The launcher / resume / NaN runs share these overrides, hence one compiled step (cache hit after the first).
BASE = SMALL + ("--config.optimizer.total_steps=40", "--config.optimizer.lr=3e-3",
                "--config.optimizer.lr_ssm=3e-3", "--config.optimizer.lr_end=3e-3")


def event_scalars(logdir: str) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} from the TensorBoard event files in `logdir` (TFRecord framing, no TensorFlow)."""
  import struct

  from tensorboardX.proto import event_pb2
  out: dict[str, dict[int, float]] = {}
  for name in sorted(os.listdir(logdir)):
    if not name.startswith("events.out.tfevents"):
      continue
    with open(os.path.join(logdir, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4  # length, its crc, payload, payload crc
      for v in ev.summary.value:
        out.setdefault(v.tag, {})[ev.step] = v.simple_value
  return out
