"""Writes a tiny official-format dataset (JSONL + .npy tensors) for the tiny DiT's stages."""

import json
import os

import numpy as np

from ttt_dit.model.configs import get_config


def write_dataset(root: str, n: int = 2, stage: str = "3s", seed: int = 0) -> str:
  """n samples with vid_emb [T, 32, H, W] (mean||logvar, small logvar) and text [L_t, 32] per segment."""
  c = get_config("tiny", "ttt_mlp", stage)
  rng = np.random.default_rng(seed)
  os.makedirs(root, exist_ok=True)
  lines = []
  for i in range(n):
    H, W = c.latent_height * c.patch_size, c.latent_width * c.patch_size
    mean = rng.normal(size=(c.num_frames, 16, H, W)).astype(np.float32)
    logvar = np.full_like(mean, -12.0)
    np.save(os.path.join(root, f"v{i}.npy"), np.concatenate([mean, logvar], axis=1))
    texts = []
    for s in range(c.num_scenes):
      np.save(os.path.join(root, f"t{i}_{s}.npy"), rng.normal(size=(c.text_len, c.text_dim)).astype(np.float32))
      texts.append(f"t{i}_{s}.npy")
    lines.append({"id": f"s{i}", "vid_emb": f"v{i}.npy", "text_chunk_emb": texts})
  index = os.path.join(root, "index.jsonl")
  with open(index, "w") as f:
    f.write("\n".join(json.dumps(l) for l in lines) + "\n")
  return index
