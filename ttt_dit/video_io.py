"""The one video writer of ttt-dit: pixels in [-1, 1] -> uint8, mp4 (imageio-ffmpeg), PNG contact sheet.

Every file is written under a temporary name in the destination folder and renamed into place when
complete, so a crash never leaves a half-written output under the final name.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

import numpy as np


def to_uint8(video: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 as the official sampler: clamp((x + 1) / 2, 0, 1), then trunc(255 x)."""
  x = np.clip((np.asarray(video, np.float32) + 1.0) / 2.0, 0.0, 1.0)
  return (255.0 * x).astype(np.uint8)                                 # truncation, like .to(uint8)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary sibling path (same extension) and renames it to `path` on success."""
  d, base = os.path.split(os.path.abspath(path))
  stem, ext = os.path.splitext(base)
  tmp = os.path.join(d, f".{stem}.tmp-{os.getpid()}{ext}")
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_mp4(path: str, frames: np.ndarray, fps: int = 16, quality: float = 8.0) -> None:
  """Writes uint8 frames [F, H, W, 3] as H.264 mp4 (yuv420p; H and W must be even)."""
  import imageio_ffmpeg  # pylint: disable=import-outside-toplevel

  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f"{path}: frames must be uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
  f, h, w, _ = frames.shape
  if f == 0 or h % 2 or w % 2:
    raise ValueError(f"{path}: need at least one frame and even height/width for yuv420p, got {frames.shape}")
  with atomic_path(path) as tmp:
    writer = imageio_ffmpeg.write_frames(tmp, (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
                                         quality=quality, macro_block_size=1, ffmpeg_log_level="error")
    writer.send(None)
    for frame in frames:
      writer.send(np.ascontiguousarray(frame))
    writer.close()


def read_mp4(path: str) -> tuple[np.ndarray, float]:
  """Decodes an mp4 back to uint8 [F, H, W, 3] and its fps (tests, inspection)."""
  import imageio.v2 as imageio  # pylint: disable=import-outside-toplevel
  reader = imageio.get_reader(path, "ffmpeg")
  try:
    fps = float(reader.get_meta_data()["fps"])
    frames = np.stack([np.asarray(fr) for fr in reader])
  finally:
    reader.close()
  return frames, fps


def scene_frame_ranges(num_scenes: int, attn_length: int = 12, prefix: int = 1,
                       temporal_compression: int = 4) -> list[tuple[int, int]]:
  """Pixel-frame [start, end) of each scene: scene 0 owns (attn+prefix) latents, later ones attn each."""
  latents = [0, attn_length + prefix] + [attn_length + prefix + attn_length * k for k in range(1, num_scenes)]
  to_px = lambda t: 0 if t == 0 else temporal_compression * (t - 1) + 1  # first latent -> 1 frame
  return [(to_px(latents[i]), to_px(latents[i + 1])) for i in range(num_scenes)]


def contact_sheet(frames: np.ndarray, ranges: Sequence[tuple[int, int]], max_cols: int = 7) -> np.ndarray:
  """Middle frame of each scene tiled row-major into one uint8 image [rows*H, cols*W, 3]."""
  picks = [frames[min((a + b) // 2, len(frames) - 1)] for a, b in ranges]   # n x [H, W, 3]
  n = len(picks)
  cols = min(n, max_cols)
  rows = -(-n // cols)
  h, w = picks[0].shape[:2]
  sheet = np.zeros((rows * h, cols * w, 3), np.uint8)
  for i, p in enumerate(picks):
    r, c = divmod(i, cols)
    sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = p
  return sheet


def write_png(path: str, image: np.ndarray) -> None:
  """Writes a uint8 [H, W, 3] image as PNG."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with atomic_path(path) as tmp:
    Image.fromarray(np.asarray(image, np.uint8)).save(tmp, format="PNG")
