"""Timing attribution for the TTT-MLP kernel: the kernel with phases removed (wrong results)."""

import statistics
import sys
import time

import jax
import jax.numpy as jnp

from pallas_kernels.ttt_mlp import kernel_acc_mgpu, kernel_mgpu
from pallas_kernels.ttt_mlp.ttt_mlp import _to_kernel_state


def main(NC=1000, H=48, reps=5, which="v2"):
  ks = jax.random.split(jax.random.PRNGKey(0), 8)
  bf = jnp.bfloat16
  q, k, v = (jax.random.normal(kk, (H, NC, 64, 64)).astype(bf) * 0.125 for kk in ks[:3])
  eta = 1e-6 * jnp.ones((H, NC, 64))
  g, b = jnp.ones((H, 64)), jnp.zeros((H, 64))
  st = _to_kernel_state(0.02 * jax.random.normal(ks[4], (H, 64, 256)), jnp.zeros((H, 1, 256)),
                        0.02 * jax.random.normal(ks[5], (H, 256, 64)), jnp.zeros((H, 1, 64)), 1)
  variants = {"v2 full": dict(), "v1 full": dict(batched=False), "skip A": dict(ablate={"A"}),
              "skip B": dict(ablate={"B"}), "skip C": dict(ablate={"C"}),
              "skip B col sums": dict(ablate={"Bsum"}), "skip B W rmw": dict(ablate={"Bw"}),
              "skip A,B,C": dict(ablate={"A", "B", "C"}),
              "G=1e6 (no ckpt)": dict(group=10**6)}
  if which == "v3":  # kernel_acc_mgpu configs (cluster 2)
    variants = {"v2 full": dict(),
                "v3 no prefetch": dict(v3=kernel_acc_mgpu.AccTuningConfig(prefetch=False)),
                "v3 prefetch": dict(v3=kernel_acc_mgpu.AccTuningConfig(prefetch=True)),
                "v3 precise update": dict(v3=kernel_acc_mgpu.AccTuningConfig(precise_update=True))}
  print(f"NC={NC} H={H}", jax.devices()[0].device_kind)
  for name, kw in variants.items():
    kw = dict(kw)
    group = kw.pop("group", 16)
    if "ablate" in kw:
      kw["ablate"] = frozenset(kw["ablate"])
    if "v3" in kw:
      fn = jax.jit(kernel_acc_mgpu.build_forward_acc(H, NC, min(group, NC), 1e-6,
                                                     config=kw["v3"]))
    else:
      fn = jax.jit(kernel_mgpu.build_forward(H, NC, min(group, NC), 1e-6, **kw))
    jax.block_until_ready(fn(q, k, v, eta, g, b, *st))
    ts = []
    for _ in range(reps):
      t = time.perf_counter()
      jax.block_until_ready(fn(q, k, v, eta, g, b, *st))
      ts.append((time.perf_counter() - t) * 1e3)
    med = statistics.median(ts)
    print(f"{name:18s} {med:8.2f} ms  {med * 1e3 / NC:6.2f} us/step", flush=True)


if __name__ == "__main__":
  sys.exit(main(which=sys.argv[1] if len(sys.argv) > 1 else "v2"))
