"""Storyboard video datasets before encoding: annotated episode clips -> 3/9/18/30/63-second samples (§5.5, §8.4).

Input: a folder of episode clips (mp4 or any format imageio reads; 16 fps, 48k+1 frames = k 3-second
segments, the last frame of a segment being the first of the next, as when an episode is cut at 48-frame
steps) and a JSONL of annotations, one clip per line, clips of an episode in playing order:

  {"id": "ep01_000", "episode": "ep01", "video": "ep01/000.mp4",
   "segments": [{"text": "...", "requires_scene_transition": false}, ...]}   # k segments

`requires_scene_transition` marks an annotated scene boundary (a new scene starts with this segment); it
becomes `<end_scene>` / `<start_scene>` tokens when the boundary falls inside a sample (§5.5, as the sampler:
a sample's first segment never gets a start token). A sample of n segments takes n consecutive segments of
one episode ([0, n), [n, 2n), ...; a remainder shorter than n is dropped and logged); its video is the
first segment's 49 frames followed by frames 1..48 of each later segment: 48n+1 frames, i.e. exactly the
VAE's 49-then-48 encode windows (§7.5).

`segment_frames` (48) is a parameter so that tiny test models (shorter windows) use the same code.
Bad data (missing file, clip of the wrong length, annotation count not matching the clip, undecodable
video) raises `BadSample` naming the sample id.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence

import numpy as np
from absl import logging

from ttt_dit.data import storyboard

FPS = 16
SEGMENT_FRAMES = 48          # new frames per 3-second segment; a clip of k segments has 48k + 1 frames


class BadSample(ValueError):
  """A sample that cannot be built; the message starts with `sample <id>:`."""

  def __init__(self, sample_id: str, reason: str):
    super().__init__(f"sample {sample_id}: {reason}")
    self.sample_id, self.reason = sample_id, reason


@dataclasses.dataclass(frozen=True)
class Clip:
  """One annotated video file: k consecutive 3-second segments of an episode."""
  id: str
  episode: str
  video: str                                   # absolute path
  segments: tuple[storyboard.Scene, ...]


@dataclasses.dataclass(frozen=True)
class Sample:
  """n consecutive segments of one episode: (clip index, segment index in clip) per segment."""
  id: str
  episode: str
  parts: tuple[tuple[int, int], ...]
  texts: tuple[str, ...]                      # per segment, with scene tokens (§5.5)


def load_annotations(path: str, video_root: str | None = None) -> list[Clip]:
  """Parses the annotation JSONL (errors name the line and clip id); video paths joined to `video_root`."""
  root = video_root if video_root is not None else os.path.dirname(os.path.abspath(path))
  clips, seen = [], set()
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{os.path.basename(path)}: line {lineno}"
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
      missing = [k for k in ("id", "episode", "video", "segments") if k not in obj]
      if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
      cid = str(obj["id"])
      if cid in seen:
        raise ValueError(f"{where}: duplicate clip id {cid!r}")
      seen.add(cid)
      if not isinstance(obj["segments"], list) or not obj["segments"]:
        raise ValueError(f"{where} (clip {cid}): 'segments' must be a non-empty list")
      segs = tuple(storyboard.parse_scene(s, f"{where} (clip {cid}), segment {i}")
                   for i, s in enumerate(obj["segments"]))
      clips.append(Clip(cid, str(obj["episode"]), os.path.join(root, obj["video"]), segs))
  if not clips:
    raise ValueError(f"{path}: no clips")
  return clips


def plan_samples(clips: Sequence[Clip], num_segments: int) -> list[Sample]:
  """Cuts each episode's segments (clip order) into samples of `num_segments`; ids `<episode>/<first seg>`."""
  episodes: dict[str, list[tuple[int, int]]] = {}
  for ci, clip in enumerate(clips):
    episodes.setdefault(clip.episode, []).extend((ci, si) for si in range(len(clip.segments)))
  samples = []
  for ep, parts in episodes.items():
    usable = len(parts) - len(parts) % num_segments
    if usable < len(parts):
      logging.info("episode %s: last %d segment(s) dropped (not a full %d-segment sample)", ep,
                   len(parts) - usable, num_segments)
    for s in range(0, usable, num_segments):
      p = tuple(parts[s:s + num_segments])
      scenes = [clips[ci].segments[si] for ci, si in p]
      scenes[0] = dataclasses.replace(scenes[0], requires_scene_transition=False)
      samples.append(Sample(f"{ep}/{s:05d}", ep, p, tuple(storyboard.scene_texts(scenes))))
  return samples


def read_video(path: str) -> np.ndarray:
  """All frames of a video file -> uint8 [F, H, W, 3] (imageio; raises OSError / ValueError)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"missing video file {path}")
  import imageio.v3 as iio  # the `video` extra
  try:
    frames = iio.imread(path)
  except Exception as err:  # decoder errors of every plugin mean an unreadable file
    raise ValueError(f"cannot decode video {path}: {type(err).__name__}: {err}") from err
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"video {path}: expected RGB frames [F, H, W, 3], got {frames.shape}")
  return frames


def clip_frames(clip: Clip, reader: Callable[[str], np.ndarray] = read_video,
                segment_frames: int = SEGMENT_FRAMES) -> np.ndarray:
  """A clip's frames [S*k+1, H, W, 3] (S = segment_frames), checked against its k annotated segments."""
  frames = reader(clip.video)
  k, s = len(clip.segments), segment_frames
  if frames.shape[0] < s + 1 or (frames.shape[0] - 1) % s:
    raise ValueError(f"clip {clip.id} ({clip.video}): {frames.shape[0]} frames is not {s}k+1 (segments of "
                     f"{s} frames + 1)")
  if (frames.shape[0] - 1) // s != k:
    raise ValueError(f"clip {clip.id} ({clip.video}): {frames.shape[0]} frames = {(frames.shape[0] - 1) // s} "
                     f"segments, but {k} annotated")
  return frames


def sample_video(sample: Sample, clips: Sequence[Clip], reader: Callable[[str], np.ndarray] = read_video,
                 segment_frames: int = SEGMENT_FRAMES) -> np.ndarray:
  """The sample's S*n+1 frames (S = segment_frames, 48 = 3 s at 16 fps) as float32 in [-1, 1] [F, H, W, 3];
  errors raise BadSample naming the sample."""
  s = segment_frames
  cache: dict[int, np.ndarray] = {}
  pieces = []
  try:
    for j, (ci, si) in enumerate(sample.parts):
      if ci not in cache:
        cache[ci] = clip_frames(clips[ci], reader, s)
      seg = cache[ci][s * si:s * (si + 1) + 1]                               # the segment's S+1 (49) frames
      pieces.append(seg if j == 0 else seg[1:])
    if len({p.shape[1:] for p in pieces}) != 1:
      raise ValueError(f"clips of different frame sizes {sorted({p.shape[1:] for p in pieces})}")
  except (OSError, ValueError) as err:
    raise BadSample(sample.id, str(err)) from err
  return np.concatenate(pieces).astype(np.float32) / 127.5 - 1.0
