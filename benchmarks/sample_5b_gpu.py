"""Storyboard -> mp4 at full 5B size on one GPU, with random weights: does it run, and how long each part takes.

    python -m benchmarks.sample_5b_gpu --stage 3s --num_steps 10 --videos 2 --output_dir /tmp/out
    python -m benchmarks.sample_5b_gpu --tiny --output_dir /tmp/out     # CPU check of this script

Builds on the device: the 5B TTT-MLP DiT (42 layers, bf16, N(0, 0.02^2) leaf by leaf, `scan_layers`,
Pallas TTT kernel), a T5-v1.1-XXL-sized encoder (random), a tokenizer trained on the storyboard's text,
and the CogVideoX VAE at diffusers' default size (`AutoencoderKLCogVideoX()`, random init, saved and put
through `converters.cogvideox_vae` as a real snapshot would be). Then `ttt_dit.pipeline.run` samples
`--videos` one-scene-per-segment videos (the first call compiles; later videos are warm) at 720x480,
16 fps, and the sidecar timings, peak memory and the mp4's decoded frame count are printed as
RESULTS.md-ready lines. The pictures are noise (random weights); the sampler, text path and VAE are the
real ones.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from experiments.configs import sample as sample_configs
from ttt_dit import pipeline, video_io
from ttt_dit.model import configs as model_configs
from ttt_dit.model.dit import DiT
from ttt_dit.model.loading import random_state
from ttt_dit.text.t5 import T5Encoder
from ttt_dit.text.tokenizer import tokenize

FLAGS = flags.FLAGS
flags.DEFINE_string("stage", "3s", "Context stage (3s: 1 scene, 13 latent frames, 49 video frames).")
flags.DEFINE_integer("num_steps", 10, "Sampler steps (50 in the official sampler).")
flags.DEFINE_integer("videos", 2, "Videos in the storyboard; the first includes compilation.")
flags.DEFINE_string("output_dir", "", "Where the mp4 / png / json go.")
flags.DEFINE_bool("tiny", False, "Tiny DiT / T5 / VAE at 48x32 pixels (a CPU check of this script).")
flags.DEFINE_string("ttt_implementation", "pallas", "xla | pallas")

T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6)
T5_TINY = dict(T5_XXL, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
SENTENCES = ["a red ball rolls across the floor", "the ball stops near a dog", "a dog runs in a sunny park",
             "tom chases jerry through the kitchen", "jerry eats cheese quietly", "blurry, low quality"] * 4


def peak_gib() -> float:
  """Peak bytes in use on device 0 (GiB), or nan where the backend does not report it."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use", float("nan")) / 2**30


def build_vae(root: str, tiny: bool):
  """The CogVideoX VAE (diffusers' default size, random init) saved as a snapshot, converted, loaded (bf16)."""
  import torch  # pylint: disable=import-outside-toplevel
  from diffusers import AutoencoderKLCogVideoX  # pylint: disable=import-outside-toplevel

  from converters.cogvideox_vae import convert_vae  # pylint: disable=import-outside-toplevel
  from ttt_dit.vae.cogvideox_vae import load_vae  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  kw = dict(down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
            block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_height=32,
            sample_width=48) if tiny else {}
  AutoencoderKLCogVideoX(**kw).eval().save_pretrained(os.path.join(root, "vae_src"))
  dtype = "float32" if tiny else "bfloat16"
  convert_vae(os.path.join(root, "vae_src"), os.path.join(root, "vae"), dtype=dtype)
  return load_vae(os.path.join(root, "vae"), dtype=jnp.dtype(dtype))


def build_components(root: str) -> pipeline.Components:
  """Random-weight DiT, T5 and tokenizer, and the converted VAE, as the pipeline's callables."""
  from tests.tiny_tokenizer import train_tiny_t5_tokenizer  # pylint: disable=import-outside-toplevel
  tiny = FLAGS.tiny
  mc = model_configs.get_config("tiny" if tiny else "5B", "ttt_mlp", FLAGS.stage)
  mc.dtype = mc.param_dtype = "float32" if tiny else "bfloat16"
  mc.scan_layers = True
  mc.ttt_implementation = FLAGS.ttt_implementation
  t0 = time.perf_counter()
  dit_gd, dit_state = random_state(nnx.eval_shape(lambda: DiT(mc, rngs=nnx.Rngs(0))), jax.random.key(0))
  t5_cfg = dict(T5_TINY, d_model=mc.text_dim) if tiny else T5_XXL
  t5_gd, t5_state = random_state(nnx.eval_shape(lambda: T5Encoder(t5_cfg, jnp.dtype(mc.dtype), rngs=nnx.Rngs(0))),
                                 jax.random.key(1), std=0.05)
  jax.block_until_ready((dit_state, t5_state))
  print(f"random DiT ({mc.num_layers} layers) + T5 ({t5_cfg['num_layers']} layers) on device: "
        f"{time.perf_counter() - t0:.0f} s", flush=True)
  train_tiny_t5_tokenizer(root, SENTENCES, vocab_size=64)
  tok_dir = os.path.join(root, "tokenizer")
  t5_apply = jax.jit(lambda s, ids: nnx.merge(t5_gd, s)(ids))

  def encode_text(texts: list[str], max_len: int) -> jax.Array:
    return t5_apply(t5_state, jnp.asarray(tokenize(texts, tok_dir, max_len)))

  def dit(params, latents, text, timesteps):
    return nnx.merge(dit_gd, params)(latents, text, timesteps)

  t0 = time.perf_counter()
  vae = build_vae(root, tiny)
  print(f"VAE built, converted and loaded: {time.perf_counter() - t0:.0f} s", flush=True)
  return pipeline.Components(dit, encode_text, vae.decode, mc, dit_params=dit_state,
                             decode_steps=vae.num_decode_steps)


def main(argv):
  del argv
  if not FLAGS.output_dir:
    raise app.UsageError("--output_dir is required")
  dev = jax.devices()[0].device_kind
  print(f"device: {dev} x{jax.device_count()}, jax {jax.__version__}", flush=True)
  with tempfile.TemporaryDirectory() as root:
    components = build_components(root)
    config = sample_configs.get_config(("tiny," if FLAGS.tiny else "") + f"stage={FLAGS.stage}")
    config.num_steps = FLAGS.num_steps
    config.checkpoint = "(random weights)"
    if FLAGS.tiny:
      config.text_len = -1
    n = model_configs.STAGE_SCENES[FLAGS.stage]
    story = [[{"text": SENTENCES[(v + s) % 5], "neg_text": SENTENCES[5]} for s in range(n)]
             for v in range(FLAGS.videos)]
    story_path = os.path.join(root, "story.json")
    with open(story_path, "w") as f:
      json.dump(story, f)
    t0 = time.perf_counter()
    written = pipeline.run(config, story_path, FLAGS.output_dir, components)
    total = time.perf_counter() - t0
  mc = components.model_config
  for j, paths in enumerate(written):
    with open(paths["json"]) as f:
      side = json.load(f)
    frames, fps = video_io.read_mp4(paths["mp4"])
    t = side["timings"]
    print(f"| {dev} | {'tiny' if FLAGS.tiny else '5B'} ({mc.num_layers} layers, scan_layers, ttt="
          f"{mc.ttt_implementation}) {FLAGS.stage} video {j} ({'first: compiles' if j == 0 else 'warm'}) | "
          f"{FLAGS.num_steps} steps, batched CFG | text {t['text_s']:.1f} s | denoise {t['denoise_s']:.1f} s "
          f"({t['denoise_s'] / FLAGS.num_steps:.2f} s/step) | VAE decode {t['decode_s']:.1f} s | "
          f"write {t['write_s']:.1f} s | mp4 {frames.shape[0]} frames {frames.shape[2]}x{frames.shape[1]} "
          f"@{fps:g} fps, {os.path.getsize(paths['mp4']) / 2**20:.1f} MiB |", flush=True)
  print(f"all videos: {total:.0f} s; peak device memory {peak_gib():.1f} GiB", flush=True)


if __name__ == "__main__":
  app.run(main)
