"""Text-to-video sampling pipeline: storyboard -> token ids -> T5 -> sampler over the DiT -> VAE -> files.

`load_components(config)` loads the three models from converted directories; `run(config,
storyboard_path, output_dir)` writes, per video, `video_XXX.mp4` (16 fps), `video_XXX_scenes.png`
(one frame per scene) and `video_XXX.json` (storyboard, seed, config, timings), each under a temporary
name renamed into place. `Components` can be built from any callables with the same contracts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from ttt_dit import video_io
from ttt_dit.data import storyboard as sb
from ttt_dit.diffusion import guidance, latent_scale
from ttt_dit.diffusion import sampler as sampler_lib
from ttt_dit.model import configs as model_configs

PRESETS = ("5B", "debug", "tiny")  # model_configs.get_config presets; converted checkpoints say "diffusers"
VAE_SPATIAL = 8
VAE_TEMPORAL = 4


@dataclasses.dataclass
class Components:
  """The models the pipeline needs, as plain callables."""
  dit: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]   # (latents [B,T,H,W,16], text [B,n,L_t,D], t [B]) -> F
  encode_text: Callable[[list[str], int], jax.Array]            # (texts, L_t) -> [N, L_t, D]
  decode: Callable[[jax.Array], jax.Array]                      # latents [B,T,h,w,16] -> video [B,F,H,W,3] in [-1, 1]
  model_config: ml_collections.ConfigDict                       # the DiT config (grid, windows, mini-batch)
  count_tokens: Callable[[list[str]], list[int]] | None = None  # untruncated token counts (warnings)
  dit_params: Any = None                                        # if set, dit is dit(params, latents, text, t)
  decode_steps: Callable[[tuple[int, ...]], int] | None = None  # if set, decode(z, progress=f) calls f(1) that often


def _dtype(name: str) -> jnp.dtype:
  """'bfloat16' -> jnp.bfloat16."""
  return jnp.dtype(name)


def component_dir(config: ml_collections.ConfigDict, field: str) -> str:
  """config.<field> ("text_encoder" | "vae"), else <checkpoint>/<field> (the layout converters.cogvideox writes)."""
  if config[field]:
    return config[field]
  if config.checkpoint and os.path.isdir(os.path.join(config.checkpoint, field)):
    return os.path.join(config.checkpoint, field)
  raise ValueError(f"sample config: no {field}: pass --config.{field}=DIR, or a --config.checkpoint=DIR "
                   f"converted from a full snapshot (with DIR/{field})")


def tokenizer_dir(config: ml_collections.ConfigDict) -> str:
  """config.tokenizer, else <text_encoder>/tokenizer when present, else the text encoder dir."""
  if config.tokenizer:
    return config.tokenizer
  text_encoder = component_dir(config, "text_encoder")
  sub = os.path.join(text_encoder, "tokenizer")
  return sub if os.path.isdir(sub) else text_encoder


def load_components(config: ml_collections.ConfigDict) -> Components:
  """Loads the DiT (`checkpoint`), T5 (`text_encoder`, tokenizer) and VAE (`vae`) named by the config.

  `text_encoder` and `vae` default to `<checkpoint>/text_encoder` and `<checkpoint>/vae`.
  """
  from ttt_dit.model.loading import load_dit_model  # pylint: disable=import-outside-toplevel
  from ttt_dit.text.t5 import load_text_encoder  # pylint: disable=import-outside-toplevel
  from ttt_dit.text.tokenizer import tokenize  # pylint: disable=import-outside-toplevel
  from ttt_dit.vae.cogvideox_vae import Tiling, load_vae  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  if not config.checkpoint:
    raise ValueError("sample config: --config.checkpoint=DIR is required")
  dirs = {"checkpoint": config.checkpoint}
  if os.path.isdir(config.checkpoint):
    dirs.update(text_encoder=component_dir(config, "text_encoder"), vae=component_dir(config, "vae"))
  for field, d in dirs.items():
    if not os.path.isdir(d):
      raise ValueError(f"sample config: {field} directory {d!r} does not exist")
  overrides = {"mini_batch_size": config.mini_batch_size} if config.mini_batch_size else {}
  for field in ("scan_layers", "ttt_implementation"):
    if config.get(field, "") != "":
      overrides[field] = config[field]
  dt = _dtype(config.dtype)
  model, model_config = load_dit_model(config.checkpoint, dtype=dt, param_dtype=dt, **overrides)
  graphdef, state = nnx.split(model)

  def dit(params, latents, text, timesteps):  # parameters enter the jitted loop as arguments
    return nnx.merge(graphdef, params)(latents, text, timesteps)

  enc = load_text_encoder(dirs["text_encoder"], dtype=dt)
  tok_dir = tokenizer_dir(config)

  def encode_text(texts: list[str], max_len: int) -> jax.Array:
    return enc(jnp.asarray(tokenize(texts, tok_dir, max_len)))

  def count_tokens(texts: list[str]) -> list[int]:  # T5 pad id is 0; EOS counts as a token
    ids = np.asarray(tokenize(texts, tok_dir, 4096))
    return [int(n) for n in (ids != 0).sum(axis=1)]

  tiling = None
  if config.vae_tiling:
    tiling = Tiling(config.vae_tile_height, config.vae_tile_width, config.vae_tile_overlap_height,
                    config.vae_tile_overlap_width)
  vae = load_vae(dirs["vae"], dtype=_dtype(config.vae_dtype), tiling=tiling)
  return Components(dit, encode_text, vae.decode, model_config, count_tokens, dit_params=state,
                    decode_steps=vae.num_decode_steps)


def stage_text_len(config: ml_collections.ConfigDict, model_config: ml_collections.ConfigDict) -> int:
  """L_t: config.text_len, else the stage's value for the checkpoint's preset (spec §1.3)."""
  if config.text_len > 0:
    return int(config.text_len)
  if model_config.preset in PRESETS:
    mc = model_configs.get_config(model_config.preset, model_config.sequence_layer, config.stage)
    return int(mc.text_len)
  # A converted diffusers checkpoint: the largest L_t <= max_text_len making the stage divisible (§1.4),
  # which gives the table values of §1.3 for CogVideoX-5B's geometry.
  mc = model_config
  n = model_configs.STAGE_SCENES[config.stage]
  t = model_configs.num_latent_frames(n, mc.attn_length, mc.prefix_temporal_length)
  mbs = config.mini_batch_size or mc.mini_batch_size
  text_len = model_configs.text_len_for(n, t, mc.latent_height * mc.latent_width, mbs, max_len=mc.max_text_len)
  if text_len is None:
    raise ValueError(f"sample config: no text length <= {mc.max_text_len} makes stage {config.stage} divisible by "
                     f"the TTT mini-batch size {mbs}; pass --config.text_len")
  return int(text_len)


def latent_shape(num_scenes: int, mc: ml_collections.ConfigDict) -> tuple[int, int, int, int, int]:
  """[1, T, H/8, W/8, C] with T = attn_length * n + prefix."""
  t = model_configs.num_latent_frames(num_scenes, mc.attn_length, mc.prefix_temporal_length)
  return (1, t, mc.latent_height * mc.patch_size, mc.latent_width * mc.patch_size, mc.in_channels)


def check_geometry(config: ml_collections.ConfigDict, mc: ml_collections.ConfigDict) -> None:
  """The requested width/height must be what the DiT's latent grid decodes to."""
  h = mc.latent_height * mc.patch_size * VAE_SPATIAL
  w = mc.latent_width * mc.patch_size * VAE_SPATIAL
  if (config.height, config.width) != (h, w):
    raise ValueError(f"sample config: {config.width}x{config.height} does not match the checkpoint's latent grid "
                     f"({mc.latent_width}x{mc.latent_height} patches of {mc.patch_size} -> {w}x{h} pixels)")


class _StepBar:
  """tqdm over denoising steps, advanced from a device host callback."""

  def __init__(self):
    self.bar = None

  def __call__(self, i) -> None:
    if self.bar is not None:
      self.bar.update(1)


def encode_video_text(components: Components, scenes: Sequence[sb.Scene], text_len: int, video: int,
                      uncond: str = "neg_text") -> tuple[jax.Array, jax.Array, list[str]]:
  """(text [1, n, L_t, D], text_uncond [1, n, L_t, D], warnings): positives with scene tokens, negatives.

  uncond: "neg_text" (released: T5 of each scene's neg_text or "") | "zeros" (CogVideoX pretraining).
  """
  if uncond not in guidance.UNCOND_MODES:
    raise ValueError(f"sample config: unknown uncond {uncond!r}; expected one of {guidance.UNCOND_MODES}")
  pos, neg = sb.scene_texts(scenes), sb.negative_texts(scenes)
  warnings = []
  if components.count_tokens is not None:
    warnings += sb.check_text_lengths(pos, components.count_tokens, text_len, video, "text")
    warnings += sb.check_text_lengths(neg, components.count_tokens, text_len, video, "neg_text")
  n = len(scenes)
  emb = components.encode_text(pos + neg, text_len)                   # [2n, L_t, D]
  if emb.shape[:2] != (2 * n, text_len):
    raise ValueError(f"text encoder returned {emb.shape}, expected [{2 * n}, {text_len}, D]")
  text, text_u = emb[:n][None], emb[n:][None]                       # [1, n, L_t, D] each
  if uncond == "zeros":
    text_u = guidance.zero_text_like(text_u)
  return text, text_u, warnings


def run(config: ml_collections.ConfigDict, storyboard_path: str, output_dir: str,
        components: Components | None = None) -> list[dict[str, str]]:
  """Samples every video of a storyboard; returns the written paths per video."""
  if config.sampler not in sampler_lib.SAMPLERS:
    raise ValueError(f"sample config: unknown sampler {config.sampler!r}; expected one of {sampler_lib.SAMPLERS}")
  max_scenes = model_configs.STAGE_SCENES[config.stage]
  videos = sb.load_storyboard(storyboard_path, max_scenes=max_scenes)
  components = components or load_components(config)
  mc = components.model_config
  check_geometry(config, mc)
  text_len = stage_text_len(config, mc)
  table = sampler_lib.step_table(config.num_steps, config.cfg_scale, config.cfg_exp, config.cfg_schedule)
  bar = _StepBar()
  cfg_sharding = sampler_lib.cfg_branch_sharding() if (config.shard_cfg and config.batch_cfg) else None
  params = components.dit_params
  if cfg_sharding is not None and params is not None:  # replicate the weights on both CFG devices
    replicated = jax.sharding.NamedSharding(cfg_sharding.mesh, jax.sharding.PartitionSpec())
    params = jax.device_put(params, replicated)
    logging.info("CFG branches sharded over %d devices", cfg_sharding.mesh.size)
  run_sampler = sampler_lib.make_sampler(components.dit, table, params=params, sampler=config.sampler,
                                         batch_cfg=config.batch_cfg, progress=bar, cfg_sharding=cfg_sharding)
  os.makedirs(output_dir, exist_ok=True)
  written = []
  for j, scenes in enumerate(videos):
    n = len(scenes)
    shape = latent_shape(n, mc)
    if mc.sequence_layer != "none":
      model_configs.validate_lengths(n, text_len, shape[1], mc.latent_height * mc.latent_width, mc.mini_batch_size)
    timings = {}
    t0 = time.perf_counter()
    with tqdm(total=1, desc=f"video {j}: text encoding", leave=False) as tb:
      text, text_u, warnings = encode_video_text(components, scenes, text_len, j, config.uncond)
      jax.block_until_ready(text)
      tb.update(1)
    timings["text_s"] = time.perf_counter() - t0
    seed = int(config.seed) + j
    k_noise, k_steps = jax.random.split(jax.random.PRNGKey(seed))
    noise = jax.random.normal(k_noise, shape, jnp.float32)            # [1, T, H/8, W/8, 16]
    t0 = time.perf_counter()
    with tqdm(total=config.num_steps, desc=f"video {j}: denoising") as pbar:
      bar.bar = pbar
      latents = jax.block_until_ready(run_sampler(noise, text, text_u, k_steps))
      jax.effects_barrier()
      bar.bar = None
    timings["denoise_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    z = latent_scale.to_vae_latents(latents, config.latent_scale).astype(_dtype(config.vae_dtype))
    if components.decode_steps is not None:  # one tick per decoded window (x tile)
      with tqdm(total=components.decode_steps(z.shape), desc=f"video {j}: VAE decode", unit="window") as vb:
        video = components.decode(z, progress=vb.update)
        video = np.asarray(jax.block_until_ready(video), np.float32)[0]     # [F, H, W, 3]
    else:
      with tqdm(total=1, desc=f"video {j}: VAE decode") as vb:
        video = np.asarray(jax.block_until_ready(components.decode(z)), np.float32)[0]
        vb.update(1)
    timings["decode_s"] = time.perf_counter() - t0
    want_frames = VAE_TEMPORAL * (shape[1] - 1) + 1
    if video.shape != (want_frames, config.height, config.width, 3):
      raise ValueError(f"VAE decode returned {video.shape}, expected ({want_frames}, {config.height}, "
                       f"{config.width}, 3)")
    t0 = time.perf_counter()
    frames = video_io.to_uint8(video)
    stem = os.path.join(output_dir, f"video_{j:03d}")
    paths = {"mp4": stem + ".mp4", "png": stem + "_scenes.png", "json": stem + ".json"}
    video_io.write_mp4(paths["mp4"], frames, fps=config.fps)
    ranges = video_io.scene_frame_ranges(n, mc.attn_length, mc.prefix_temporal_length, VAE_TEMPORAL)
    video_io.write_png(paths["png"], video_io.contact_sheet(frames, ranges, config.contact_sheet_cols))
    timings["write_s"] = time.perf_counter() - t0
    sidecar = {"video": j, "storyboard": [s.to_dict() for s in scenes], "prompts": sb.scene_texts(scenes),
               "seed": seed, "config": config.to_dict(), "text_len": text_len, "latent_shape": list(shape),
               "frames": int(frames.shape[0]), "warnings": warnings,
               "timings": {k: round(v, 4) for k, v in timings.items()}}
    with video_io.atomic_path(paths["json"]) as tmp:
      with open(tmp, "w", encoding="utf-8") as f:
        json.dump(sidecar, f, indent=2)
    logging.info("video %d: %s (%s)", j, paths["mp4"], sidecar["timings"])
    written.append(paths)
  return written
