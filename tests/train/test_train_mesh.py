"""Same per-step losses on 1 device and on a (data=4, fsdp=2, tensor=1) mesh of 8 CPU devices (subprocess)."""

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train_launcher import REPO  # noqa: E402
from tiny_data import write_dataset  # noqa: E402

SCRIPT = """
import json, sys
from experiments.configs import stage
from ttt_dit.train import run
out = {}
for name, mesh in (("one", (1, 1, 1)), ("eight", (4, 2, 1))):
  c = stage.get_config("tiny_3s")
  c.data.index = sys.argv[1]; c.mesh.shape = mesh; c.global_batch = 8; c.optimizer.total_steps = 3
  run(c, sys.argv[2] + "/" + name)
  out[name] = [json.loads(l)["loss"] for l in open(sys.argv[2] + "/" + name + "/metrics.jsonl")]
print("LOSSES" + json.dumps(out))
"""


def test_one_vs_eight_devices(tmp_path):
  index = write_dataset(str(tmp_path / "data"), n=4)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", SCRIPT, index, str(tmp_path)], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.split("LOSSES")[-1])
  assert len(out["one"]) == len(out["eight"]) == 3
  for a, b in zip(out["one"], out["eight"]):
    assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (out["one"], out["eight"])
