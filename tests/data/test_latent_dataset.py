"""Bad data in the official precomputed format: reported by sample id; skip vs fail; skips counted."""

import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train"))
from tiny_data import write_dataset  # noqa: E402

from ttt_dit.data.latents import LatentDataset  # noqa: E402
from ttt_dit.model.configs import get_config  # noqa: E402

C = get_config("tiny", "ttt_mlp", "3s")


def _corrupt(root, kind):
  """Breaks sample s1 in one way."""
  index = os.path.join(root, "index.jsonl")
  lines = [json.loads(l) for l in open(index)]
  if kind == "missing":
    os.remove(os.path.join(root, "v1.npy"))
  elif kind == "length":
    np.save(os.path.join(root, "v1.npy"), np.zeros((C.num_frames + 1, 32, 4, 6), np.float32))
  elif kind == "count":
    lines[1]["text_chunk_emb"] = lines[1]["text_chunk_emb"] * 2
  elif kind == "corrupt":
    with open(os.path.join(root, "v1.pt"), "wb") as f:
      f.write(b"not a tensor")
    lines[1]["vid_emb"] = "v1.pt"
  with open(index, "w") as f:
    f.write("\n".join(map(json.dumps, lines)) + "\n")
  return index


@pytest.mark.parametrize("kind", ["missing", "length", "count", "corrupt"])
def test_bad_sample_fail_and_skip(tmp_path, kind):
  index = write_dataset(str(tmp_path), n=3)
  _corrupt(str(tmp_path), kind)
  with pytest.raises(ValueError, match="sample s1"):
    LatentDataset(index, C.num_frames, C.num_scenes, on_error="fail")
  ds = LatentDataset(index, C.num_frames, C.num_scenes, on_error="skip")
  assert len(ds) == 2 and list(ds.skipped) == ["s1"]


def test_torch_pt_official_layout(tmp_path):
  index = write_dataset(str(tmp_path), n=1)
  v = np.load(tmp_path / "v0.npy")
  torch.save(torch.from_numpy(v).to(torch.bfloat16), tmp_path / "v0.pt")
  lines = [json.loads(l) for l in open(index)]
  lines[0]["vid_emb"] = "v0.pt"
  open(index, "w").write(json.dumps(lines[0]) + "\n")
  ds = LatentDataset(index, C.num_frames, C.num_scenes)
  moments, text = ds.batch(0, 2)
  assert moments.shape == (2, C.num_frames, 4, 6, 32) and text.shape == (2, 1, C.text_len, C.text_dim)
  ref = torch.from_numpy(v).to(torch.bfloat16).float().numpy().transpose(0, 2, 3, 1)
  np.testing.assert_array_equal(moments[0], ref)
