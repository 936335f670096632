"""ttt-dit: TTT-Video (CogVideoX-5B + Test-Time-Training layers) in JAX / Flax NNX.

The public loaders import lazily so that `import ttt_dit` stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_dit(path: str, dtype: Any = None):
  """Loads a converted DiT checkpoint directory; returns `dit(latents, text, timesteps)`."""
  from ttt_dit.model.loading import load_dit as _load
  return _load(path) if dtype is None else _load(path, dtype=dtype)


def load_text_encoder(path: str, dtype: Any = None):
  """Loads a converted T5 encoder; returns `enc(input_ids [B, L]) -> [B, L, D]`."""
  from ttt_dit.text.t5 import load_text_encoder as _load
  return _load(path) if dtype is None else _load(path, dtype=dtype)


def load_vae(path: str, dtype: Any = None):
  """Loads a converted CogVideoX VAE; returns an object with `.encode` and `.decode`."""
  from ttt_dit.vae.cogvideox_vae import load_vae as _load
  return _load(path) if dtype is None else _load(path, dtype=dtype)
