"""Times the training step (forward + backward + AdamW, sharded as in training) on whatever devices exist.

    python -m benchmarks.train_step --config=experiments/configs/stage.py:3s --preset=debug --mesh=1,-1,1
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python -m benchmarks.train_step --config=experiments/configs/stage.py:tiny_3s --mesh=2,2,2

Builds the stage's trainer exactly as `ttt_dit.train.run` does (`ttt_dit.train.loop.build`: partition
rules, optimizer groups, remat, gradient accumulation), feeds random latents/text of the stage's shapes,
and prints a RESULTS.md-ready table row: median step ms over `--steps` timed steps after one compile
step, and tokens/s = global batch x L / median step time (L = T*h*w + n*L_t). Not a test.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from ttt_dit.train import loop, sharding

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/stage.py:tiny_3s", "Stage config.",
                                          lock_config=False)
_PRESET = flags.DEFINE_string("preset", "", "Model preset override (5B | debug | tiny); empty = the config's.")
_LAYERS = flags.DEFINE_integer("num_layers", 0, "Override the model depth (0 = the preset's): the step time "
                                "of a 42-layer model is about 42x that of 1 layer; compile time grows with it.")
_MESH = flags.DEFINE_string("mesh", "", "data,fsdp,tensor (one may be -1); empty = the config's mesh if it "
                            "fits the devices, else 1,-1,1 (FSDP over all devices).")
_BATCH = flags.DEFINE_integer("global_batch", 0, "Global batch; 0 = one sample per data-parallel rank.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (after one compile + warm-up step).")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"], "jax.distributed.initialize().")

HEADER = ("| preset | layers | stage | layer | mesh (data,fsdp,tensor) | devices | global batch | accum | remat group | "
          "median step ms | tokens/s | compile s |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def _mesh_shape(config) -> tuple[int, ...]:
  """--mesh, else the config's mesh when it fits the device count, else FSDP over every device."""
  if _MESH.value:
    return tuple(int(v) for v in _MESH.value.split(","))
  shape = tuple(config.mesh.shape)
  if int(np.prod(shape)) == jax.device_count():
    return shape
  logging.warning("config mesh %s does not fit %d devices; using (1, -1, 1)", shape, jax.device_count())
  return (1, -1, 1)


def main(argv):
  del argv
  sharding.maybe_initialize_distributed(_DISTRIBUTED.value)
  config = _CONFIG.value
  if _PRESET.value:
    config.model.preset = _PRESET.value
  if _LAYERS.value:
    config.model.overrides.num_layers = _LAYERS.value
  mesh = sharding.make_mesh(_mesh_shape(config))
  config.mesh.shape = tuple(mesh.shape.values())
  config.global_batch = _BATCH.value or sharding.data_parallel_size(mesh)
  tr = loop.build(config, mesh)
  m = tr.model_config
  rng = np.random.default_rng(0)
  B = config.global_batch
  mean = rng.normal(size=(B, m.num_frames, m.patch_size * m.latent_height, m.patch_size * m.latent_width,
                          m.in_channels)).astype(np.float32)
  moments = np.concatenate([mean, np.full_like(mean, -12.0)], axis=-1)   # [B, T, H, W, 2C]
  text = rng.normal(size=(B, m.num_scenes, m.text_len, m.text_dim)).astype(np.float32)
  moments, text = tr.put_batch(moments, text)
  params, opt_state = tr.params, tr.opt_state
  key = jax.random.key(0)
  times = []
  with jax.set_mesh(tr.mesh):
    for i in range(_STEPS.value + 1):
      t0 = time.perf_counter()
      params, opt_state, metrics = tr.step(params, opt_state, moments, text, jax.random.fold_in(key, i))
      loss = float(metrics["loss"])  # blocks
      times.append(time.perf_counter() - t0)
      logging.info("step %d: %.1f ms, loss %.4f", i, times[-1] * 1e3, loss)
  median_ms = float(np.median(times[1:])) * 1e3
  tokens = B * loop.tokens_per_sample(m)
  dev = jax.devices()[0]
  row = (f"| {m.preset} | {m.num_layers} | {config.stage} | {m.sequence_layer} | {','.join(map(str, config.mesh.shape))} | "
         f"{jax.device_count()} x {dev.device_kind} | {B} | {config.optimizer.grad_accum_steps} | "
         f"{m.remat_layer_group_size} | {median_ms:.1f} | {tokens / (median_ms / 1e3):.0f} | {times[0]:.1f} |")
  print(HEADER)
  print(row)
  print(f"jax {jax.__version__}, {jax.process_count()} process(es), platform {dev.platform}, "
        f"L = {loop.tokens_per_sample(m)} tokens per sample, median of {_STEPS.value} steps")


if __name__ == "__main__":
  app.run(main)
