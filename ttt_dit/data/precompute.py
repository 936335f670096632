"""Precompute training data: VAE-encode storyboard samples and T5-encode their texts into the TFDS format.

The project's own JAX models (converted checkpoint dirs): `vae.encode` over the sample's 49-then-48-frame
windows with conv caches carried between them (§7.5; the window = one 3-second segment), stored as
mean || logvar, unscaled; each segment's text (scene tokens per §5.5) T5-encoded at the stage's L_t.
Output is atomic: every stage is built under `<output_dir>.tmp-<pid>`, which is renamed to `<output_dir>`
only when all stages are complete (with `skipped.json`: {stage: {sample id: reason}}).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import logging
from tqdm import tqdm

from ttt_dit.data import episodes, tfds_builder

_TEXT_CACHE = 64


def make_encode(vae: Any, text_encoder: Callable, clips: Sequence[episodes.Clip], text_len: int,
                segment_frames: int = episodes.SEGMENT_FRAMES,
                reader: Callable[[str], np.ndarray] = episodes.read_video) -> tfds_builder.Encode:
  """sample -> (moments [T, h, w, 2C], text [n, L_t, D]) float32; T5 outputs of the last `_TEXT_CACHE` distinct
  texts kept (a 5B-size embedding is 8 MB: consecutive samples of an episode share few texts)."""
  text_cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()

  def encode(sample: episodes.Sample) -> tuple[np.ndarray, np.ndarray]:
    video = episodes.sample_video(sample, clips, reader, segment_frames)          # [F, H, W, 3] in [-1, 1]
    mean, logvar = vae.encode(video[None])                                         # [1, T, h, w, C] each
    moments = np.concatenate([np.asarray(mean, np.float32), np.asarray(logvar, np.float32)], -1)[0]
    new = [t for t in dict.fromkeys(sample.texts) if t not in text_cache]
    if new:
      emb = np.asarray(text_encoder(text_encoder.tokenize(new, text_len)), np.float32)  # [k, L_t, D]
      text_cache.update(zip(new, emb))
    text = np.stack([text_cache[t] for t in sample.texts])                       # [n, L_t, D]
    for t in sample.texts:
      text_cache.move_to_end(t)
    while len(text_cache) > _TEXT_CACHE:
      text_cache.popitem(last=False)
    return moments, text

  return encode


def _first_frame_size(clips: Sequence[episodes.Clip], reader: Callable[[str], np.ndarray]) -> tuple[int, int]:
  """(H, W) of the first readable clip (to declare the feature shapes before encoding)."""
  for clip in clips:
    try:
      return tuple(reader(clip.video).shape[1:3])
    except (OSError, ValueError):
      continue
  raise ValueError("no readable video among the annotated clips")


def export_official(dataset_dir: str, out_dir: str) -> str:
  """A built TFDS stage dataset -> the official precomputed layout (§8.4) read by `latents.LatentDataset`:
  `index.jsonl` of {"id", "vid_emb": "vid/<k>.npy" [T, 2C, h, w], "text_chunk_emb": ["txt/<k>_<i>.npy" [L_t, D]]}
  (float32 .npy; the official files are bf16 torch tensors of the same shapes). Returns the index path."""
  src = tfds_builder.data_source(dataset_dir)
  os.makedirs(os.path.join(out_dir, "vid"), exist_ok=True)
  os.makedirs(os.path.join(out_dir, "txt"), exist_ok=True)
  lines = []
  for k in range(len(src)):
    rec = src[k]
    sid = rec["id"].decode()
    vid = f"vid/{k:06d}.npy"
    np.save(os.path.join(out_dir, vid), np.transpose(np.asarray(rec["moments"], np.float32), (0, 3, 1, 2)))
    txt = []
    for i, t in enumerate(np.asarray(rec["text"], np.float32)):
      txt.append(f"txt/{k:06d}_{i}.npy")
      np.save(os.path.join(out_dir, txt[-1]), t)
    lines.append({"id": sid, "vid_emb": vid, "text_chunk_emb": txt})
  index = os.path.join(out_dir, "index.jsonl")
  with open(index, "w") as f:
    f.write("".join(json.dumps(l) + "\n" for l in lines))
  return index


def precompute(annotations: str, output_dir: str, vae: Any, text_encoder: Callable, stages: Sequence[str],
               text_lens: dict[str, int], video_root: str | None = None, dtype: str = "bfloat16",
               on_error: str = "fail", segment_frames: int = episodes.SEGMENT_FRAMES, overwrite: bool = False,
               official: bool = False, reader: Callable[[str], np.ndarray] = episodes.read_video
               ) -> dict[str, dict[str, str]]:
  """Builds `<output_dir>/storyboard_latents/<stage>/1.0.0` for each stage (and, with `official`, the same
  samples in the official layout under `<output_dir>/official/<stage>/index.jsonl`); returns the skipped
  samples {stage: {id: reason}}."""
  output_dir = os.path.abspath(output_dir)
  if os.path.exists(output_dir) and not overwrite:
    raise ValueError(f"{output_dir} exists (pass overwrite=True / --overwrite to replace it)")
  clips = episodes.load_annotations(annotations, video_root)
  H, W = _first_frame_size(clips, reader)
  scale = getattr(vae, "spatial_scale", 8)
  if H % scale or W % scale:
    raise ValueError(f"frames {H}x{W} not divisible by the VAE's spatial factor {scale}")
  channels = 2 * int(vae.cfg["latent_channels"])
  t_per_seg = segment_frames // 4                                    # temporal compression 4
  tmp = f"{output_dir}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  skipped: dict[str, dict[str, str]] = {}
  try:
    for stage in stages:
      n = tfds_builder.STAGE_SEGMENTS[stage]
      samples = episodes.plan_samples(clips, n)
      if not samples:
        raise ValueError(f"stage {stage}: no episode has {n} segments")
      L = text_lens[stage]
      encode = make_encode(vae, text_encoder, clips, L, segment_frames, reader)
      D = int(np.asarray(text_encoder(text_encoder.tokenize([""], L))).shape[-1])
      with tqdm(total=len(samples), desc=f"precompute {stage}") as bar:
        b = tfds_builder.build(tmp, stage, samples, encode, moments_shape=(t_per_seg * n + 1, H // scale,
                               W // scale, channels), text_shape=(n, L, D), dtype=dtype, on_error=on_error,
                               progress=bar.update)
      skipped[stage] = dict(b.skipped)
      if official:
        export_official(tfds_builder.dataset_dir(tmp, stage), os.path.join(tmp, "official", stage))
      logging.info("stage %s: %d samples written, %d skipped", stage, len(samples) - len(b.skipped),
                   len(b.skipped))
    shutil.rmtree(os.path.join(tmp, "downloads"), ignore_errors=True)   # TFDS' (empty) download cache
    with open(os.path.join(tmp, "skipped.json"), "w") as f:
      json.dump(skipped, f, indent=1)
    if os.path.exists(output_dir):
      old = f"{output_dir}.old-{os.getpid()}"
      os.rename(output_dir, old)
      os.rename(tmp, output_dir)
      shutil.rmtree(old)
    else:
      os.rename(tmp, output_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return skipped
