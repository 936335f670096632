"""Tiny inputs for the TFDS / precompute tests: episode clips (mp4), annotations, converted VAE + T5.

Sizes fit the tiny DiT of `stage.py:tiny_3s`: segments of 8 frames (+1) -> 3 latent frames for a
1-segment sample, 32x48 pixels -> 4x6 latents of 16 channels, T5 width 32.
"""

import json
import os

import numpy as np
from tiny_tokenizer import train_tiny_t5_tokenizer

SEGMENT_FRAMES = 8
H, W = 32, 48
SENTENCES = ["a cat sits on the mat", "tom chases jerry through the kitchen", "the dog runs in the park",
             "jerry eats cheese quietly", "a bright sunny day over the house"] * 4


def write_video(path: str, frames: np.ndarray) -> None:
  """uint8 [F, H, W, 3] -> mp4 at 16 fps."""
  import imageio.v3 as iio
  os.makedirs(os.path.dirname(path), exist_ok=True)
  iio.imwrite(path, frames, fps=16, codec="libx264", macro_block_size=16)


def smooth_frames(n: int, seed: int) -> np.ndarray:
  """Smooth colour gradients (survive mp4 compression) [n, H, W, 3] uint8."""
  rng = np.random.default_rng(seed)
  y, x = np.meshgrid(np.linspace(0, 1, H), np.linspace(0, 1, W), indexing="ij")
  base = rng.uniform(0.2, 0.8, size=3)
  t = np.arange(n)[:, None, None, None] / max(n, 1)
  img = base + 0.3 * np.stack([x, y, 1 - x], -1)[None] * np.cos(2 * np.pi * (t + base))
  return (255 * np.clip(img, 0, 1)).astype(np.uint8)


# Episode ep0: clip c0 (2 segments, scene cut at its 2nd), clip c1 (1 segment); ep1: clip c2 (3 segments).
CLIPS = [("c0", "ep0", [("tom chases jerry", False), ("jerry eats cheese", True)]),
         ("c1", "ep0", [("the dog runs in the park", False)]),
         ("c2", "ep1", [("a cat sits on the mat", False), ("a bright sunny day", False),
                        ("tom chases jerry", True)])]


def write_episodes(root: str, clips=CLIPS, frames: dict | None = None) -> str:
  """Writes clips (48k+1 -> here 8k+1 frames each unless `frames[id]` says otherwise) + annotations.jsonl."""
  lines = []
  for i, (cid, ep, segs) in enumerate(clips):
    n = (frames or {}).get(cid, SEGMENT_FRAMES * len(segs) + 1)
    write_video(os.path.join(root, ep, f"{cid}.mp4"), smooth_frames(n, i))
    lines.append({"id": cid, "episode": ep, "video": f"{ep}/{cid}.mp4",
                  "segments": [{"text": t, "requires_scene_transition": f} for t, f in segs]})
  path = os.path.join(root, "annotations.jsonl")
  with open(path, "w") as f:
    f.write("\n".join(json.dumps(l) for l in lines) + "\n")
  return path


def write_models(root: str) -> tuple[str, str]:
  """Tiny random diffusers VAE (16 latent channels, logvar ~ -12) and T5 (d_model 32), converted."""
  import torch
  import transformers
  from diffusers import AutoencoderKLCogVideoX

  from converters.cogvideox_vae import convert_vae
  from converters.t5 import convert_text_encoder
  torch.manual_seed(0)
  vae = AutoencoderKLCogVideoX(
      down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
      block_out_channels=(8, 8, 16, 16), latent_channels=16, layers_per_block=1, norm_num_groups=4,
      temporal_compression_ratio=4, sample_height=H, sample_width=W).eval()
  with torch.no_grad():  # small posterior variance: the sampled latents stay close to the mean (overfittable)
    out = vae.encoder.conv_out.conv
    out.weight[16:] *= 0.01
    out.bias[16:] = -12.0
  vae.save_pretrained(os.path.join(root, "vae_src"))
  convert_vae(os.path.join(root, "vae_src"), os.path.join(root, "vae"))
  train_tiny_t5_tokenizer(root, SENTENCES, vocab_size=40)
  cfg = transformers.T5Config(vocab_size=90, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                              relative_attention_num_buckets=8, relative_attention_max_distance=20,
                              feed_forward_proj="gated-gelu", is_encoder_decoder=False)
  t5 = transformers.T5EncoderModel(cfg).eval()
  t5.save_pretrained(os.path.join(root, "t5_src"))
  convert_text_encoder(os.path.join(root, "t5_src"), os.path.join(root, "tokenizer"), os.path.join(root, "t5"))
  return os.path.join(root, "vae"), os.path.join(root, "t5")
