"""One subprocess with 8 CPU devices: per-step loss and grad norm on 1 device == on a (data=2, fsdp=2,
tensor=2) mesh == on 1 device with grad_accum_steps=2; the partition rules really shard params and
optimizer state (spec §8.1)."""

import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runs import REPO, env  # noqa: E402
from tiny_data import write_dataset  # noqa: E402

SCRIPT = """
import json, sys
import jax
from experiments.configs import stage
from ttt_dit.model import partition
from ttt_dit.train import loop, run

def cfg(mesh, accum):
  c = stage.get_config("tiny_3s")
  c.model.overrides.num_layers = 1; c.ttt_diagnostics_every = 0
  c.data.index = sys.argv[1]; c.mesh.shape = mesh; c.global_batch = 8; c.optimizer.total_steps = 3
  c.optimizer.grad_accum_steps = accum
  c.timestep_ranks = 4  # the (2, 2, 2) mesh's data x fsdp: same stratified t on every run
  return c

out = {}
for name, mesh, accum in (("one", (1, 1, 1), 1), ("mesh", (2, 2, 2), 1), ("accum", (1, 1, 1), 2)):
  run(cfg(mesh, accum), sys.argv[2] + "/" + name)
  out[name] = [(m["loss"], m["grad_norm"]) for m in map(json.loads, open(sys.argv[2] + "/" + name + "/metrics.jsonl"))]
tr = loop.build(cfg((2, 2, 2), 1))
def describe(tree):
  return {partition.path_str(p): [str(tuple(x.sharding.spec)), list(x.addressable_shards[0].data.shape), list(x.shape)]
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}
out["params"], out["opt_state"] = describe(tr.params), describe(tr.opt_state)
print("RESULT" + json.dumps(out))
"""


def test_one_device_vs_mesh_vs_accumulation_and_sharding(tmp_path):
  index = write_dataset(str(tmp_path / "data"), n=4)
  r = subprocess.run([sys.executable, "-c", SCRIPT, index, str(tmp_path)], cwd=REPO, env=env(8),
                     capture_output=True, text=True, timeout=400)
  assert r.returncode == 0, r.stderr[-4000:]
  out = json.loads(r.stdout.split("RESULT")[-1])
  assert len(out["one"]) == len(out["mesh"]) == len(out["accum"]) == 3
  for other in ("mesh", "accum"):
    for (l1, g1), (l2, g2) in zip(out["one"], out[other]):
      assert abs(l1 - l2) <= 1e-4 * max(1.0, abs(l1)), (other, out["one"], out[other])
      assert abs(g1 - g2) <= 1e-3 * max(1.0, abs(g1)), (other, out["one"], out[other])
  # Parameters: [spec, local shard shape, global shape].
  p = out["params"]
  L = "layers.0.seq_modeling_block."
  expect = {
      L + "q.kernel": ("('fsdp', 'tensor')", [32, 32]), L + "q.bias": ("('tensor',)", [32]),
      L + "o.kernel": ("('tensor', 'fsdp')", [32, 32]),
      L + "ssm.ttt.wq.kernel": ("('fsdp', 'tensor')", [32, 32]),
      L + "ssm.ttt.W1": ("('tensor',)", [2, 16, 64]), L + "ssm.ttt.W2": ("('tensor',)", [2, 64, 16]),
      L + "ssm.ttt.ttt_norm_weight": ("('tensor',)", [2, 16]),
      L + "ssm.ttt.learnable_ttt_lr_weight": ("()", [4, 1, 64]),
      L + "forward_ssm_gating_text.gating_alpha": ("()", [64]),
      "layers.0.mlp.layer1.kernel": ("('fsdp', None)", [32, 256]),
      "layers.0.mlp.layer2.kernel": ("('fsdp', None)", [128, 64]),
      "patch_embedding.vid_proj.kernel": ("('fsdp', None)", [32, 64]),
  }
  for name, (spec, local) in expect.items():
    assert p[name][:2] == [spec, local], (name, p[name])
  size = lambda shape: int(np.prod(shape))
  assert sum(size(local) for _, local, _ in p.values()) < 0.45 * sum(size(full) for *_, full in p.values())
  # Optimizer state: each Adam moment sharded exactly like its parameter; step counts replicated.
  moments = {n: v for n, v in out["opt_state"].items() if ".mu." in n or ".nu." in n}
  assert len(moments) == 2 * len(p)  # tiny_3s is sft: every parameter trained
  for n, v in moments.items():
    param = n.split(".mu.")[-1] if ".mu." in n else n.split(".nu.")[-1]
    assert v == p[param], (n, v, p[param])
  counts = [v for n, v in out["opt_state"].items() if n.endswith("count")]
  assert counts and all(v[0] == "()" for v in counts)
