"""Precomputed training data in the official format (spec §8.4), read without TensorFlow.

Index: JSONL, one sample per line `{"vid_emb": path, "text_chunk_emb": [path_0, ...]}` (relative paths
joined to the index's folder; optional "id"). `vid_emb` = VAE mean||logvar [T, 32, H, W] (official
channels-first; `.pt` torch tensors, torch imported lazily, or `.npy`), `text_chunk_emb[i]` = [L_t, D].
Samples are returned channels-last: moments [T, H, W, 32], text [n, L_t, D]. Bad samples raise
ValueError naming the sample id, or are skipped and counted (`on_error="skip"`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
from absl import logging


def _load_array(path: str) -> np.ndarray:
  """One tensor file (.npy or torch .pt) -> float32 numpy array."""
  if not os.path.exists(path):
    raise FileNotFoundError(path)
  try:
    if path.endswith(".npy"):
      return np.load(path).astype(np.float32)
    import torch  # lazily: only the official .pt format needs it
    return torch.load(path, map_location="cpu", weights_only=True).float().numpy()
  except Exception as err:  # pickle / zip / numpy format errors all mean a corrupt file
    raise ValueError(f"corrupt tensor file {path}: {type(err).__name__}: {err}") from err


@dataclass
class LatentDataset:
  """Official-format JSONL dataset: validated samples by index, bad ones reported by id."""

  index_path: str
  num_frames: int
  num_scenes: int
  on_error: str = "fail"                      # "fail" | "skip"
  skipped: dict[str, str] = field(default_factory=dict)

  def __post_init__(self):
    if self.on_error not in ("fail", "skip"):
      raise ValueError(f"on_error must be 'fail' or 'skip', got {self.on_error!r}")
    root = os.path.dirname(os.path.abspath(self.index_path))
    self.entries = []
    with open(self.index_path) as f:
      for i, line in enumerate(f):
        if line.strip():
          e = json.loads(line)
          e.setdefault("id", f"line{i}")
          e["vid_emb"] = os.path.join(root, e["vid_emb"])
          e["text_chunk_emb"] = [os.path.join(root, p) for p in e["text_chunk_emb"]]
          self.entries.append(e)
    self.samples = []
    for e in self.entries:
      try:
        self.samples.append(self._load(e))
      except (ValueError, OSError, RuntimeError) as err:
        msg = f"sample {e['id']}: {err}"
        if self.on_error == "fail":
          raise ValueError(msg) from err
        self.skipped[e["id"]] = str(err)
        logging.warning("skipping bad sample %s", msg)
    logging.info("dataset %s: %d samples, %d skipped", self.index_path, len(self.samples), len(self.skipped))
    if not self.samples:
      raise ValueError(f"dataset {self.index_path}: no usable samples (skipped {len(self.skipped)})")

  def _load(self, e: dict) -> tuple[np.ndarray, np.ndarray]:
    """Reads and validates one sample -> (moments [T, H, W, 32], text [n, L_t, D])."""
    vid = _load_array(e["vid_emb"])                                   # [T, 32, H, W]
    if vid.ndim != 4 or vid.shape[0] != self.num_frames or vid.shape[1] % 2:
      raise ValueError(f"vid_emb {e['vid_emb']}: expected [T={self.num_frames}, 2C, H, W], got {vid.shape}")
    if len(e["text_chunk_emb"]) != self.num_scenes:
      raise ValueError(f"text_chunk_emb: expected {self.num_scenes} segments, got {len(e['text_chunk_emb'])}")
    texts = [_load_array(p) for p in e["text_chunk_emb"]]
    if len({t.shape for t in texts}) != 1 or texts[0].ndim != 2:
      raise ValueError(f"text_chunk_emb shapes differ or are not [L_t, D]: {[t.shape for t in texts]}")
    if not (np.isfinite(vid).all() and all(np.isfinite(t).all() for t in texts)):
      raise ValueError("non-finite values in tensors")
    return np.transpose(vid, (0, 2, 3, 1)), np.stack(texts)          # [T, H, W, 2C], [n, L_t, D]

  def __len__(self) -> int:
    return len(self.samples)

  def batch_indices(self, step: int, batch_size: int, seed: int = 0) -> np.ndarray:
    """Deterministic indices of the global batch at `step` (fixed-seed shuffle per epoch): resumable by step."""
    n = len(self.samples)
    flat = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs, pos = flat // n, flat % n
    return np.array([np.random.default_rng([seed, int(ep)]).permutation(n)[p] for ep, p in zip(epochs, pos)])

  def batch(self, step: int, batch_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(moments [B, T, H, W, 2C], text [B, n, L_t, D]) for a training step."""
    idx = self.batch_indices(step, batch_size, seed)
    return (np.stack([self.samples[i][0] for i in idx]), np.stack([self.samples[i][1] for i in idx]))


def sample_latents(moments, eps):
  """z = mean + exp(logvar/2) * eps with logvar clamped to [-30, 20] (spec §8.4); scale factor 1.0."""
  import jax.numpy as jnp
  mean, logvar = jnp.split(moments, 2, axis=-1)
  return mean + jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0)) * eps
