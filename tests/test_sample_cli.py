"""End-to-end sampling: storyboard -> tiny DiT (real, random weights) -> mp4 / PNG / JSON.

STAND-IN NOTE: the T5 encoder and VAE here are small deterministic stand-ins with the same contracts
(`encode_text(texts, L_t) -> [N, L_t, D]`, `decode(latents) -> video [B, F, H, W, 3]`), used until the
real tiny T5/VAE loaders are wired in; the DiT is the real tiny preset saved with `save_dit`.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from experiments.configs import sample as sample_config
from ttt_dit import pipeline, video_io
from ttt_dit.model import configs as model_configs
from ttt_dit.model.dit import DiT
from ttt_dit.model.loading import load_dit_model, save_dit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORY = [[
    {"text": "a red ball rolls", "neg_text": "blurry"},
    {"text": "the ball stops", "requires_scene_transition": True},
    {"text": "a dog runs in from the left side of a sunny green park at noon"},  # 16 stand-in tokens > L_t
]]


def standin_components(checkpoint: str) -> pipeline.Components:
  """Real tiny DiT from `checkpoint`, stand-in T5 (character-hash embeddings) and stand-in VAE decode."""
  model, mc = load_dit_model(checkpoint)
  graphdef, state = nnx.split(model)
  dit = lambda params, x, text, t: nnx.merge(graphdef, params)(x, text, t)
  table = jax.random.normal(jax.random.PRNGKey(5), (97, mc.text_dim))

  def encode_text(texts, max_len):
    ids = np.zeros((len(texts), max_len), np.int32)
    for i, s in enumerate(texts):
      codes = [ord(ch) % 96 + 1 for ch in s][:max_len]
      ids[i, :len(codes)] = codes
    return table[ids]                                                # [N, L_t, D]

  def decode(z):                                                     # [B, T, h, w, 16] -> [B, 1+4(T-1), 8h, 8w, 3]
    x = jnp.tanh(z[..., :3].astype(jnp.float32))
    x = jnp.concatenate([x[:, :1], jnp.repeat(x[:, 1:], 4, axis=1)], axis=1)
    return jnp.repeat(jnp.repeat(x, 8, axis=2), 8, axis=3)

  return pipeline.Components(dit, encode_text, decode, mc, lambda texts: [len(t.split()) + 1 for t in texts],
                             dit_params=state)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("ckpt") / "tiny")
  mc = model_configs.get_config("tiny", "ttt_mlp", "9s")
  save_dit(d, DiT(mc, rngs=nnx.Rngs(0)), mc)
  return d


def _check_outputs(out_dir, n_scenes=3, stage_frames=None):
  mp4 = os.path.join(out_dir, "video_000.mp4")
  frames, fps = video_io.read_mp4(mp4)
  want_frames = stage_frames or 4 * (2 * n_scenes + 1 - 1) + 1          # tiny: T = 2n + 1
  assert frames.shape == (want_frames, 32, 48, 3) and fps == 16.0
  sheet = np.asarray(Image.open(os.path.join(out_dir, "video_000_scenes.png")))
  assert sheet.shape == (32, 48 * n_scenes, 3)
  side = json.load(open(os.path.join(out_dir, "video_000.json")))
  assert side["seed"] == 42 and side["storyboard"][1]["requires_scene_transition"] is True
  assert side["prompts"][0].endswith("<end_scene>") and side["config"]["stage"] == "9s"
  assert set(side["timings"]) == {"text_s", "denoise_s", "decode_s", "write_s"}
  assert not [f for f in os.listdir(out_dir) if ".tmp-" in f]
  return frames


def test_pipeline_standins_writes_decodable_mp4(tiny_checkpoint, tmp_path):
  story = tmp_path / "story.json"
  story.write_text(json.dumps(STORY))
  config = sample_config.get_config("tiny,stage=9s")
  config.checkpoint = tiny_checkpoint
  comps = standin_components(tiny_checkpoint)
  pipeline.run(config, str(story), str(tmp_path / "a"), components=comps)
  a = _check_outputs(str(tmp_path / "a"))
  side = json.load(open(tmp_path / "a" / "video_000.json"))
  assert side["text_len"] == 10 and len(side["warnings"]) == 1
  assert "video 0, scene 2: text has 16 tokens" in side["warnings"][0] and "6 tokens will be truncated" in side["warnings"][0]
  assert a.std() > 0  # not a constant video
  # Wrong geometry and too many scenes are refused with clear errors.
  config.width = 64
  with pytest.raises(ValueError, match="does not match the checkpoint's latent grid"):
    pipeline.run(config, str(story), str(tmp_path / "b"), components=comps)
  config.width = 48
  story.write_text(json.dumps([STORY[0] * 2]))
  with pytest.raises(ValueError, match="6 scenes, too many for the stage"):
    pipeline.run(config, str(story), str(tmp_path / "b"), components=comps)


CLI_STANDIN = """
import sys
sys.path.insert(0, {tests!r})
from absl import app
import experiments.sample as cli
from ttt_dit import pipeline
import test_sample_cli as t
pipeline.load_components = lambda config: t.standin_components(config.checkpoint)
app.run(cli.main, argv=sys.argv)
"""


def test_cli_standin_end_to_end(tiny_checkpoint, tmp_path):
  story = tmp_path / "story.jsonl"
  story.write_text(json.dumps(STORY[0]) + "\n")
  out = tmp_path / "out"
  cmd = [sys.executable, "-c", CLI_STANDIN.format(tests=os.path.join(REPO, "tests")),
         f"--config={os.path.join(REPO, 'experiments/configs/sample.py')}:tiny,stage=9s",
         f"--config.checkpoint={tiny_checkpoint}", "--config.num_steps=4", f"--storyboard={story}",
         f"--output_dir={out}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  _check_outputs(str(out))
  assert "denoising" in res.stderr  # tqdm progress


def test_config_args():
  assert sample_config.get_config(":stage=63s").stage == "63s"
  assert sample_config.get_config("stage=63s").width == 720
  c = sample_config.get_config("tiny,stage=9s")
  assert (c.stage, c.width, c.height, c.num_steps, c.cfg_scale, c.cfg_exp, c.seed, c.fps, c.latent_scale) == (
      "9s", 48, 32, 50, 6.0, 5, 42, 16, 1.0)
  with pytest.raises(ValueError, match="unknown stage"):
    sample_config.get_config("stage=5s")
  with pytest.raises(ValueError, match="unknown arg"):
    sample_config.get_config("huge")


def test_video_io_pieces(tmp_path):
  # Official conversion: clamp((x + 1) / 2, 0, 1), then truncation of 255 x.
  np.testing.assert_array_equal(video_io.to_uint8(np.array([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0])),
                                [0, 0, 127, 254, 255, 255])
  # Spec §11.2: 13 latents -> 49 frames, 253 latents (21 scenes) -> 1009 frames.
  assert video_io.scene_frame_ranges(1) == [(0, 49)]
  r = video_io.scene_frame_ranges(21)
  assert r[-1][1] == 1009 and all(b - a == 48 for a, b in r[1:])
  frames = np.zeros((9, 4, 6, 3), np.uint8)
  frames[2], frames[7] = 50, 200
  sheet = video_io.contact_sheet(frames, [(0, 5), (5, 9)])
  assert sheet.shape == (4, 12, 3) and sheet[0, 0, 0] == 50 and sheet[0, 6, 0] == 200
  with pytest.raises(ValueError, match="even height/width"):
    video_io.write_mp4(str(tmp_path / "odd.mp4"), np.zeros((2, 5, 6, 3), np.uint8))
  assert not os.listdir(tmp_path)


def test_encode_video_text_branches(tiny_checkpoint):
  comps = standin_components(tiny_checkpoint)
  from ttt_dit.data import storyboard as sb
  scenes = sb.parse_storyboard(STORY)[0]
  text, text_u, _ = pipeline.encode_video_text(comps, scenes, 10, 0)
  assert text.shape == text_u.shape == (1, 3, 10, comps.model_config.text_dim)
  np.testing.assert_array_equal(text[0], comps.encode_text(sb.scene_texts(scenes), 10))
  np.testing.assert_array_equal(text_u[0], comps.encode_text(["blurry", "", ""], 10))
  _, zeros, _ = pipeline.encode_video_text(comps, scenes, 10, 0, uncond="zeros")
  assert not np.any(np.asarray(zeros))
  with pytest.raises(ValueError, match="unknown uncond"):
    pipeline.encode_video_text(comps, scenes, 10, 0, uncond="empty")
