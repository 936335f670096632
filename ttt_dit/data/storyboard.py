"""Storyboards: the official multi-scene prompt format, validated, with scene tokens (spec §5.5).

A storyboard file is a JSON list of videos or JSONL with one video per line; a video is a list of
3-second scenes `{"text": str, "requires_scene_transition": bool (default false), "neg_text": str
(optional)}`. Scene tokens follow the official code: for scene i > 0 with a transition, scene i-1's
text gets `<end_scene>` appended and scene i's text gets `<start_scene>` prepended (no spaces); scene
0's flag is forced false. Negative prompts carry no scene tokens.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Sequence

from absl import logging

START_SCENE = "<start_scene>"
END_SCENE = "<end_scene>"
FIELDS = ("text", "requires_scene_transition", "neg_text")


@dataclasses.dataclass(frozen=True)
class Scene:
  """One 3-second segment of a video."""
  text: str
  requires_scene_transition: bool = False
  neg_text: str = ""

  def to_dict(self) -> dict[str, Any]:
    """The official JSON form."""
    return dataclasses.asdict(self)


def _where(source: str, video: int, scene: int | None = None, line: int | None = None) -> str:
  """'story.json: video 2 (line 3), scene 1' — the position named by every error."""
  s = f"{source}: video {video}"
  if line is not None:
    s += f" (line {line})"
  return s if scene is None else f"{s}, scene {scene}"


def parse_scene(obj: Any, where: str) -> Scene:
  """Validates one scene dict; errors name the field."""
  if not isinstance(obj, dict):
    raise ValueError(f"{where}: expected an object {{'text': ...}}, got {type(obj).__name__}")
  unknown = sorted(set(obj) - set(FIELDS))
  if unknown:
    raise ValueError(f"{where}: unknown field(s) {unknown}; allowed fields are {list(FIELDS)}")
  if "text" not in obj:
    raise ValueError(f"{where}: missing field 'text'")
  text = obj["text"]
  if not isinstance(text, str):
    raise ValueError(f"{where}: field 'text' must be a string, got {type(text).__name__}")
  flag = obj.get("requires_scene_transition", False)
  if not isinstance(flag, bool):
    raise ValueError(f"{where}: field 'requires_scene_transition' must be true or false, got {flag!r}")
  neg = obj.get("neg_text", "")
  if neg is None:
    neg = ""
  if not isinstance(neg, str):
    raise ValueError(f"{where}: field 'neg_text' must be a string, got {type(neg).__name__}")
  return Scene(text, flag, neg)


def parse_video(obj: Any, source: str, video: int, line: int | None = None,
                max_scenes: int | None = None) -> list[Scene]:
  """Validates one video (a non-empty list of scenes, at most `max_scenes`)."""
  where = _where(source, video, line=line)
  if not isinstance(obj, list):
    raise ValueError(f"{where}: expected a list of scenes, got {type(obj).__name__}")
  if not obj:
    raise ValueError(f"{where}: empty list of scenes (need at least one)")
  if max_scenes is not None and len(obj) > max_scenes:
    raise ValueError(f"{where}: {len(obj)} scenes, too many for the stage (at most {max_scenes})")
  scenes = [parse_scene(s, _where(source, video, i, line)) for i, s in enumerate(obj)]
  if scenes[0].requires_scene_transition:  # official: scene 0's flag is forced false
    scenes[0] = dataclasses.replace(scenes[0], requires_scene_transition=False)
  return scenes


def parse_storyboard(data: Any, source: str = "<storyboard>", max_scenes: int | None = None
                     ) -> list[list[Scene]]:
  """Validates an already-decoded JSON list of videos."""
  if not isinstance(data, list):
    raise ValueError(f"{source}: top level must be a list of videos, got {type(data).__name__}")
  if not data:
    raise ValueError(f"{source}: no videos")
  if all(isinstance(v, dict) for v in data):
    raise ValueError(f"{source}: top level is a list of scenes; wrap it in a list of videos: [[{{...}}, ...]]")
  return [parse_video(v, source, i, max_scenes=max_scenes) for i, v in enumerate(data)]


def parse_jsonl(text: str, source: str = "<storyboard>", max_scenes: int | None = None) -> list[list[Scene]]:
  """One video (a JSON list of scenes) per non-blank line."""
  videos = []
  for lineno, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{source}: line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    videos.append(parse_video(obj, source, len(videos), line=lineno, max_scenes=max_scenes))
  if not videos:
    raise ValueError(f"{source}: no videos")
  return videos


def load_storyboard(path: str, max_scenes: int | None = None) -> list[list[Scene]]:
  """Reads a JSON list of videos or JSONL (one video per line); raises ValueError naming what is wrong."""
  if not os.path.exists(path):
    raise ValueError(f"storyboard file {path!r} does not exist")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  source = os.path.basename(path)
  if path.endswith(".jsonl"):
    return parse_jsonl(text, source, max_scenes)
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    if path.endswith(".json") or len([l for l in text.splitlines() if l.strip()]) <= 1:
      raise ValueError(f"{source}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    return parse_jsonl(text, source, max_scenes)
  return parse_storyboard(data, source, max_scenes)


def scene_texts(scenes: Sequence[Scene]) -> list[str]:
  """Positive prompts with scene tokens placed exactly as the official sampler does."""
  texts = [s.text for s in scenes]
  for i in range(1, len(scenes)):
    if scenes[i].requires_scene_transition:
      texts[i - 1] = texts[i - 1] + END_SCENE
      texts[i] = START_SCENE + texts[i]
  return texts


def negative_texts(scenes: Sequence[Scene]) -> list[str]:
  """Per-scene negative prompts (`neg_text` or ""), without scene tokens."""
  return [s.neg_text for s in scenes]


def check_text_lengths(texts: Sequence[str], count_tokens: Callable[[list[str]], list[int]], max_len: int,
                       video: int = 0, kind: str = "text") -> list[str]:
  """Warns (absl) for each text longer than max_len tokens, naming the truncated token count."""
  warnings = []
  for i, n in enumerate(count_tokens(list(texts))):
    if n > max_len:
      msg = (f"video {video}, scene {i}: {kind} has {n} tokens, longer than L_t = {max_len}; "
             f"{n - max_len} tokens will be truncated")
      logging.warning(msg)
      warnings.append(msg)
  return warnings
