"""Storyboard parsing: the official format (JSON and JSONL), scene tokens, and malformed inputs."""

import json

import pytest

from ttt_dit.data import storyboard as sb

OFFICIAL = [[
    {"text": "A cat walks into a kitchen.", "requires_scene_transition": False, "neg_text": "blurry"},
    {"text": "The cat jumps on the table.", "requires_scene_transition": False},
    {"text": "Night falls over the city.", "requires_scene_transition": True, "neg_text": "text, watermark"},
], [{"text": "A single scene.", "requires_scene_transition": True}]]


def test_json_and_jsonl_agree(tmp_path):
  pj = tmp_path / "story.json"
  pj.write_text(json.dumps(OFFICIAL))
  pl = tmp_path / "story.jsonl"
  pl.write_text("\n".join(json.dumps(v) for v in OFFICIAL) + "\n\n")
  a, b = sb.load_storyboard(str(pj)), sb.load_storyboard(str(pl))
  assert a == b and len(a) == 2 and [len(v) for v in a] == [3, 1]
  assert a[0][1].neg_text == "" and a[0][2].neg_text == "text, watermark"
  assert a[1][0].requires_scene_transition is False  # scene 0's flag is forced false
  one = tmp_path / "one.jsonl"
  one.write_text(json.dumps(OFFICIAL[0]))
  assert sb.load_storyboard(str(one)) == a[:1]


def test_scene_tokens_as_official():
  v = sb.parse_storyboard(OFFICIAL)[0]
  assert sb.scene_texts(v) == [
      "A cat walks into a kitchen.",
      "The cat jumps on the table.<end_scene>",
      "<start_scene>Night falls over the city.",
  ]
  assert sb.negative_texts(v) == ["blurry", "", "text, watermark"]
  both = sb.parse_storyboard([[{"text": "a"}, {"text": "b", "requires_scene_transition": True},
                               {"text": "c", "requires_scene_transition": True}]])[0]
  assert sb.scene_texts(both) == ["a<end_scene>", "<start_scene>b<end_scene>", "<start_scene>c"]
  first = sb.parse_storyboard([[{"text": "a", "requires_scene_transition": True}]])[0]
  assert sb.scene_texts(first) == ["a"]


@pytest.mark.parametrize("data, pattern", [
    ({"text": "x"}, r"top level must be a list of videos"),
    ([], r"no videos"),
    ([{"text": "x"}], r"list of scenes; wrap it"),
    ([[{"text": "a"}], "oops"], r"video 1: expected a list of scenes, got str"),
    ([[{"text": "a"}], []], r"video 1: empty list of scenes"),
    ([[{"text": "a"}, {"neg_text": "b"}]], r"video 0, scene 1: missing field 'text'"),
    ([[{"text": 3}]], r"video 0, scene 0: field 'text' must be a string, got int"),
    ([[{"text": "a"}, {"text": "b", "requires_scene_transition": "yes"}]],
     r"video 0, scene 1: field 'requires_scene_transition' must be true or false"),
    ([[{"text": "a", "neg_text": ["x"]}]], r"video 0, scene 0: field 'neg_text' must be a string, got list"),
    ([[{"text": "a", "prompt": "b"}]], r"video 0, scene 0: unknown field\(s\) \['prompt'\]"),
    ([[{"text": "a"}, "b"]], r"video 0, scene 1: expected an object"),
    ([[{"text": "a"}], [{"text": "a"}] * 4], r"video 1: 4 scenes, too many for the stage \(at most 3\)"),
])
def test_malformed(data, pattern):
  with pytest.raises(ValueError, match=pattern):
    sb.parse_storyboard(data, max_scenes=3)


def test_malformed_files(tmp_path):
  p = tmp_path / "bad.json"
  p.write_text('[[{"text": "a"}')
  with pytest.raises(ValueError, match=r"bad.json: invalid JSON"):
    sb.load_storyboard(str(p))
  q = tmp_path / "bad.jsonl"
  q.write_text('[{"text": "a"}]\n[{"text": 1}]\n')
  with pytest.raises(ValueError, match=r"bad.jsonl: video 1 \(line 2\), scene 0: field 'text'"):
    sb.load_storyboard(str(q))
  r = tmp_path / "bad2.jsonl"
  r.write_text('[{"text": "a"}]\n{oops\n')
  with pytest.raises(ValueError, match=r"bad2.jsonl: line 2: invalid JSON"):
    sb.load_storyboard(str(r))
  with pytest.raises(ValueError, match="does not exist"):
    sb.load_storyboard(str(tmp_path / "missing.json"))


def test_long_text_warning():
  counter = lambda texts: [len(t.split()) + 1 for t in texts]  # words + EOS
  warnings = sb.check_text_lengths(["a b c", "a b c d e f"], counter, max_len=5, video=2)
  assert len(warnings) == 1
  assert "video 2, scene 1" in warnings[0] and "7 tokens" in warnings[0] and "2 tokens will be truncated" in warnings[0]
