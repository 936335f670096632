"""5B DiT on GPU with random weights: forward latency, sampler step latency and peak memory per stage.

    python -m benchmarks.dit_5b_gpu --stages 3s,9s --attention cudnn,xla --ttt xla,pallas --sample_steps 3

Builds the CogVideoX-5B + TTT-MLP DiT (bf16 parameters, as `ttt_dit.load_dit` serves them) directly on
the device, then per stage: the median ms of one conditional forward (B=1) for each attention / TTT
implementation, and the median ms of one guided sampler step (batched CFG, B=2, through
`ttt_dit.diffusion.sampler.make_sampler`), with the CFG branches sharded over two devices when there
are two. Prints RESULTS.md-ready lines. Not a test: it measures, on whatever accelerator is present.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from ttt_dit.diffusion import sampler as sampler_lib
from ttt_dit.model import configs as model_configs
from ttt_dit.model.dit import DiT
from ttt_dit.model.loading import random_state

FLAGS = flags.FLAGS
flags.DEFINE_list("stages", ["3s", "9s"], "Context stages to time.")
flags.DEFINE_list("attention", ["cudnn", "xla"], "attention_implementation values to time.")
flags.DEFINE_list("ttt", ["xla", "pallas"], "ttt_implementation values to time.")
flags.DEFINE_integer("sample_steps", 3, "Sampler steps timed (of a 50-step table); 0 skips the sampler.")
flags.DEFINE_integer("repeats", 3, "Timed repeats per variant (after one compile/warm-up call).")
flags.DEFINE_string("sequence_layer", "ttt_mlp", "ttt_mlp | ttt_linear | none")
flags.DEFINE_string("preset", "5B", "Model preset (tiny for a CPU check of this script).")
flags.DEFINE_integer("num_layers", 0, "Override the number of layers (0: the preset's).")
flags.DEFINE_bool("scan_layers", True, "Layers as one lax.scan (compile one layer); False unrolls them.")


def peak_gib() -> float:
  """Peak bytes in use on device 0 (GiB), or nan where the backend does not report it."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use", float("nan")) / 2**30


def median_ms(fn, *args) -> tuple[float, float]:
  """(seconds of the first call: compile + run, median ms of FLAGS.repeats further calls)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  times = []
  for _ in range(FLAGS.repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return first, float(np.median(times))


def build_state(config):
  """(graphdef, state) of a DiT with N(0, 0.02^2) parameters made leaf by leaf on the device."""
  return random_state(nnx.eval_shape(lambda: DiT(config, rngs=nnx.Rngs(0))), jax.random.key(0))


def graphdef_of(config):
  """The DiT graphdef of `config` (implementation switches are static), without allocating."""
  return nnx.split(nnx.eval_shape(lambda: DiT(config, rngs=nnx.Rngs(0))))[0]


def inputs(config, batch: int):
  """Random latents [B, T, 60, 90, 16], text [B, n, L_t, 4096] (bf16) and timesteps [B]."""
  k1, k2 = jax.random.split(jax.random.key(1))
  lat = jax.random.normal(k1, (batch, config.num_frames, 2 * config.latent_height, 2 * config.latent_width,
                               config.in_channels), jnp.bfloat16)
  text = jax.random.normal(k2, (batch, config.num_scenes, config.text_len, config.text_dim), jnp.bfloat16)
  return lat, text, jnp.full((batch,), 500, jnp.int32)


def main(argv):
  del argv
  dev = jax.devices()[0].device_kind
  print(f"device: {dev} x{jax.device_count()}, jax {jax.__version__}")
  for stage in FLAGS.stages:
    base = model_configs.get_config(FLAGS.preset, FLAGS.sequence_layer, stage)
    base.dtype = base.param_dtype = "bfloat16"
    base.scan_checkpoint_group_size = 10**6  # inference: no scan checkpoints
    base.scan_layers = FLAGS.scan_layers
    if FLAGS.num_layers:
      base.num_layers = FLAGS.num_layers
    graphdef, state = build_state(base)
    lat, text, t = inputs(base, 1)
    tokens = base.num_frames * base.latent_height * base.latent_width + base.num_scenes * base.text_len
    for attn in FLAGS.attention:
      for ttt in FLAGS.ttt if FLAGS.sequence_layer != "none" else ["-"]:
        cfg = base.copy_and_resolve_references()
        cfg.attention_implementation = attn
        if ttt != "-":
          cfg.ttt_implementation = ttt
        gd = graphdef_of(cfg)
        fwd = jax.jit(lambda s, a, b, c, gd=gd: nnx.merge(gd, s)(a, b, c))
        try:
          first, ms = median_ms(fwd, state, lat, text, t)
          print(f"| {dev} | {FLAGS.preset} ({base.num_layers} layers{', scanned' if base.scan_layers else ''}) {FLAGS.sequence_layer} {stage} fwd B=1 | {tokens} tokens | attention={attn} "
                f"ttt={ttt} | {ms:.1f} ms | peak {peak_gib():.1f} GiB | first call {first:.0f} s |", flush=True)
        except Exception as e:  # a variant that does not compile here is reported, not fatal
          print(f"| {dev} | {FLAGS.preset} {stage} fwd attention={attn} ttt={ttt} | FAILED: {type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]} |", flush=True)
    if FLAGS.sample_steps > 0:
      n = FLAGS.sample_steps
      short = sampler_lib.step_table(n)  # n steps of the same cost as any of the 50
      shard = sampler_lib.cfg_branch_sharding()
      cfg = base.copy_and_resolve_references()
      cfg.attention_implementation = FLAGS.attention[0]
      gd = graphdef_of(cfg)
      run = sampler_lib.make_sampler(lambda p, x, tx, tt: nnx.merge(gd, p)(x, tx, tt), short, params=state,
                                     cfg_sharding=shard)
      key = jax.random.key(2)
      first, ms = median_ms(run, lat.astype(jnp.float32), text, jnp.zeros_like(text), key)
      print(f"| {dev} x{jax.device_count()} | {FLAGS.preset} ({base.num_layers} layers) {FLAGS.sequence_layer} {stage} sampler, batched CFG "
            f"({'sharded over 2 GPUs' if shard is not None else '1 GPU'}) | {n} steps {ms:.0f} ms = "
            f"{ms / n:.0f} ms/step -> 50 steps ~{ms / n * 50 / 1e3:.0f} s | peak {peak_gib():.1f} GiB | "
            f"first call {first:.0f} s |", flush=True)
    del state


if __name__ == "__main__":
  app.run(main)
