"""Multi-scene token bookkeeping for the TTT layer (spec §4): static index arrays.

Everything here depends only on the sequence layout (scenes, text length, frames, grid), so it is
computed once with NumPy and applied as gathers. "Original order" is
`[text_0 | ... | text_{n-1} | video]`; "interleaved order" is
`[text_0, frames of segment 0, text_1, frames of segment 1, ...]` where segment 0 owns the extra
leading latent frame(s).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np


@dataclasses.dataclass(frozen=True)
class SequenceMetadata:
  """Layout of one DiT sequence; height/width are in *patch* units (tokens per row/column)."""

  num_scenes: int  # n: 3-second text segments
  text_len: int  # L_t: tokens per text segment
  num_frames: int  # T: latent frames
  height: int  # h: patch rows per frame
  width: int  # w: patch columns per frame

  def __post_init__(self):
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"SequenceMetadata.{f.name} must be a positive int, got {v!r}")
    if self.num_frames < self.num_scenes:
      raise ValueError(f"SequenceMetadata: {self.num_frames} latent frames cannot hold "
                       f"{self.num_scenes} scenes")

  @property
  def tokens_per_frame(self) -> int:
    return self.height * self.width

  @property
  def text_tokens(self) -> int:
    return self.num_scenes * self.text_len

  @property
  def video_tokens(self) -> int:
    return self.num_frames * self.tokens_per_frame

  @property
  def total(self) -> int:
    return self.text_tokens + self.video_tokens

  def segment_frames(self) -> tuple[int, ...]:
    """Latent frames per TTT segment: (f + T mod f, f, f, ...) with f = T // n (spec §4.1)."""
    n, T = self.num_scenes, self.num_frames
    f = T // n
    return (f + T % f,) + (f,) * (n - 1) if n > 1 else (T,)


@functools.lru_cache(maxsize=64)
def interleave_index(meta: SequenceMetadata) -> np.ndarray:
  """pi: int32 [L]; interleaved[i] = original[pi[i]] (spec §4.1)."""
  P, Lt, n = meta.tokens_per_frame, meta.text_len, meta.num_scenes
  parts, frame0 = [], 0
  for c, frames in enumerate(meta.segment_frames()):
    parts.append(np.arange(c * Lt, (c + 1) * Lt))  # text of segment c
    parts.append(n * Lt + np.arange(frame0 * P, (frame0 + frames) * P))  # its video tokens
    frame0 += frames
  idx = np.concatenate(parts).astype(np.int32)
  assert idx.shape == (meta.total,) and frame0 == meta.num_frames
  return idx


@functools.lru_cache(maxsize=64)
def deinterleave_index(meta: SequenceMetadata) -> np.ndarray:
  """pi^-1: int32 [L]; original[p] = interleaved[pi^-1[p]] (spec §4.3)."""
  return np.argsort(interleave_index(meta)).astype(np.int32)


@functools.lru_cache(maxsize=64)
def reverse_index(meta: SequenceMetadata) -> np.ndarray:
  """Rev as a gather: text segments in reverse order (tokens kept), video tokens flipped (§4.4)."""
  Lt, n = meta.text_len, meta.num_scenes
  text = np.concatenate([np.arange(c * Lt, (c + 1) * Lt) for c in reversed(range(n))])
  video = meta.text_tokens + np.arange(meta.video_tokens)[::-1]
  return np.concatenate([text, video]).astype(np.int32)


@functools.lru_cache(maxsize=64)
def eta_gather_index(meta: SequenceMetadata, mini_batch_size: int, eta_mode: str) -> np.ndarray:
  """int32 [NC, CS]: original-order token whose learning rate scales interleaved token (m, j).

  "per_token": each token's own rate, pi(m*CS + j). "official" (spec §4.2 [QUIRK]): the official
  code permutes the rows of the [.., CS, CS] eta matrix and its kernel reads only the last row, so
  interleaved mini-batch m uses the rates of the original mini-batch s = pi(m*CS + CS - 1) // CS.
  With one scene both are the identity.
  """
  C = int(mini_batch_size)
  if meta.total % C:
    raise ValueError(f"sequence length {meta.total} (= {meta.num_scenes} x {meta.text_len} text + "
                     f"{meta.num_frames} x {meta.tokens_per_frame} video tokens) is not a multiple "
                     f"of the TTT mini-batch size {C}")
  pi = interleave_index(meta).reshape(-1, C)  # [NC, CS]
  if eta_mode == "per_token":
    return pi
  if eta_mode == "official":
    s = pi[:, -1] // C  # [NC]
    return (s[:, None] * C + np.arange(C)[None, :]).astype(np.int32)
  raise ValueError(f"eta_mode must be 'official' or 'per_token', got {eta_mode!r}")
