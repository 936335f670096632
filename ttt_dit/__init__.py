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
  """Loads a converted T5 encoder; returns `enc(input_ids [B, L]) -> [B, L, D]`.

  `enc.tokenize(texts, max_length)` (or `ttt_dit.tokenize`) turns strings into the ids it takes.
  """
  from ttt_dit.text.t5 import load_text_encoder as _load
  return _load(path) if dtype is None else _load(path, dtype=dtype)


def tokenize(texts: list[str], path: str, max_length: int):
  """Strings -> int32 ids [N, max_length] (EOS, pad id 0, truncated), scene tokens added as official.

  `path` is a tokenizer folder or a converted text encoder folder (which holds `tokenizer/`).
  """
  from ttt_dit.text.tokenizer import tokenize as _tokenize
  return _tokenize(list(texts), path, max_length)


def load_vae(path: str, dtype: Any = None, tiling: Any = None):
  """Loads a converted CogVideoX VAE: `.encode(video [B, T, H, W, 3] in [-1, 1]) -> (mean, logvar)` each
  [B, (T-1)/4+1, H/8, W/8, C_lat], `.decode(latents [B, t, h, w, C_lat]) -> video [B, 4(t-1)+1, 8h, 8w, 3]`.

  `tiling`: optional `ttt_dit.vae.cogvideox_vae.Tiling` (spatially tiled decode, as diffusers' `tiled_decode`).
  """
  from ttt_dit.vae.cogvideox_vae import load_vae as _load
  kwargs = {} if dtype is None else {"dtype": dtype}
  return _load(path, tiling=tiling, **kwargs)
