"""End to end with the real loaders: a tiny CogVideoX-style snapshot -> converters.cogvideox -> experiments.sample.

The snapshot is built here with random weights and `save_pretrained`: a diffusers
CogVideoXTransformer3DModel (transformer/), a diffusers AutoencoderKLCogVideoX (vae/), a transformers
T5EncoderModel (text_encoder/) and a sentencepiece T5 tokenizer trained on a few sentences (tokenizer/).
Both the conversion and the sampling run as subprocesses of the documented command lines, so
`pipeline.load_components` goes through `load_dit`, `load_text_encoder` and `load_vae`.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tiny_tokenizer import train_tiny_t5_tokenizer
from ttt_dit import video_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
SENTENCES = ["a red ball rolls across the floor", "the ball stops near a dog", "a dog runs in a sunny park",
             "tom chases jerry through the kitchen", "jerry eats cheese quietly"] * 4
# Tiny geometry: 48x32 pixels -> 6x4 latents -> 3x2 patches; windows of 1 + 2 latent frames.
TRANSFORMER = dict(num_attention_heads=4, attention_head_dim=16, in_channels=16, out_channels=16, time_embed_dim=32,
                   text_embed_dim=32, num_layers=2, sample_width=6, sample_height=4, sample_frames=9, patch_size=2,
                   use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False)
STORY = [[
    {"text": "a red ball rolls across the floor", "neg_text": "blurry"},
    {"text": "a dog runs in a sunny park", "requires_scene_transition": True},
]]
NUM_LATENT = 2 * 2 + 1                  # attn_length * n + 1
NUM_FRAMES = 4 * (NUM_LATENT - 1) + 1   # 17 pixel frames
TEXT_LEN = 9                            # 2 * 9 + 5 * 6 = 48 tokens: 6 TTT mini-batches of 8


def build_snapshot(root: str) -> str:
  """Writes ROOT/{transformer,vae,text_encoder,tokenizer} as a CogVideoX snapshot (random weights)."""
  import torch
  import transformers
  from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

  os.makedirs(root)
  tok = train_tiny_t5_tokenizer(root, SENTENCES, vocab_size=48)
  os.replace(os.path.join(root, "spiece.model"), os.path.join(root, "tokenizer", "spiece.model"))  # as published
  for name in ("corpus.txt", "spiece.vocab"):
    os.remove(os.path.join(root, name))

  torch.manual_seed(0)
  t5 = transformers.T5EncoderModel(transformers.T5Config(
      vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
      relative_attention_max_distance=20, feed_forward_proj="gated-gelu", is_encoder_decoder=False)).eval()
  t5.save_pretrained(os.path.join(root, "text_encoder"))

  dit = CogVideoXTransformer3DModel(**TRANSFORMER).eval()
  with torch.no_grad():
    for p in dit.parameters():
      p.add_(0.05 * torch.randn_like(p))  # zero-initialised output layers would give a constant video
  dit.save_pretrained(os.path.join(root, "transformer"))

  vae = AutoencoderKLCogVideoX(
      down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
      block_out_channels=(8, 8, 16, 16), latent_channels=16, layers_per_block=1, norm_num_groups=4,
      temporal_compression_ratio=4, sample_height=32, sample_width=48).eval()
  vae.save_pretrained(os.path.join(root, "vae"))
  return root


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """(snapshot dir, converted dir) through the converter's command line."""
  root = tmp_path_factory.mktemp("e2e")
  snap = build_snapshot(str(root / "snapshot"))
  dst = str(root / "converted")
  cmd = [sys.executable, "-m", "converters.cogvideox", f"--src={snap}", f"--dst={dst}", "--sequence_layer=ttt_mlp",
         "--attn_length=2", "--mini_batch_size=8", "--dtype=float32"]
  res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  return snap, dst


def _sample(checkpoint: str, story: str, out: str, *extra: str) -> subprocess.CompletedProcess:
  cmd = [sys.executable, "-m", "experiments.sample", "--config=experiments/configs/sample.py:tiny,stage=9s",
         f"--config.checkpoint={checkpoint}", "--config.num_steps=3", f"--config.text_len={TEXT_LEN}",
         f"--storyboard={story}", f"--output_dir={out}", *extra]
  return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)


def test_converted_snapshot_layout(converted):
  snap, dst = converted
  assert sorted(os.listdir(dst)) == ["text_encoder", "transformer", "vae"]
  assert sorted(os.listdir(os.path.join(dst, "text_encoder", "tokenizer"))) == sorted(
      os.listdir(os.path.join(snap, "tokenizer")))
  assert not [f for f in os.listdir(os.path.dirname(dst)) if "tmp" in f or "spill" in f]


def test_snapshot_to_mp4_end_to_end(converted, tmp_path):
  _, dst = converted
  story = tmp_path / "story.json"
  story.write_text(json.dumps(STORY))
  runs = []
  for name in ("a", "b"):
    out = tmp_path / name
    res = _sample(dst, str(story), str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    for bar in (r"text encoding: 100%\|[^|]*\| 1/1", r"denoising: 100%\|[^|]*\| 3/3",
                r"VAE decode: 100%\|[^|]*\| 2/2"):  # tqdm: one tick per step, per VAE window (3 + 2 latents)
      assert re.search(bar, res.stderr), bar
    assert sorted(os.listdir(out)) == ["video_000.json", "video_000.mp4", "video_000_scenes.png"]  # no temp files
    frames, fps = video_io.read_mp4(str(out / "video_000.mp4"))
    assert frames.shape == (NUM_FRAMES, 32, 48, 3) and fps == 16.0
    assert frames.std() > 0
    sheet = np.asarray(Image.open(out / "video_000_scenes.png"))
    assert sheet.shape == (32, 48 * 2, 3)
    side = json.loads((out / "video_000.json").read_text())
    assert side["seed"] == 42 and side["storyboard"][1]["requires_scene_transition"] is True
    assert side["prompts"] == ["a red ball rolls across the floor<end_scene>", "<start_scene>a dog runs in a sunny park"]
    assert side["config"]["checkpoint"] == dst and side["config"]["num_steps"] == 3
    assert side["text_len"] == TEXT_LEN and side["latent_shape"] == [1, NUM_LATENT, 4, 6, 16]
    assert set(side["timings"]) == {"text_s", "denoise_s", "decode_s", "write_s"}
    runs.append(frames)
  np.testing.assert_array_equal(runs[0], runs[1])  # same seed -> identical frames


def test_load_components_defaults_and_vae_tiling(converted, tmp_path):
  """text_encoder / vae default to <checkpoint>/...; --config.vae_tiling reaches the VAE (windows x tiles)."""
  from experiments.configs import sample as sample_config
  from ttt_dit import pipeline
  _, dst = converted
  config = sample_config.get_config("tiny,stage=9s")
  config.checkpoint = dst
  config.vae_tiling, config.vae_tile_height, config.vae_tile_width = True, 16, 24
  config.vae_tile_overlap_height, config.vae_tile_overlap_width = 1 / 2, 1 / 3
  comps = pipeline.load_components(config)
  assert comps.model_config.preset == "diffusers" and comps.model_config.attn_length == 2
  assert comps.decode_steps((1, NUM_LATENT, 4, 6, 16)) == 2 * 4 * 3  # 2 windows x (rows 0,1,2,3) x (cols 0,2,4)
  config.vae_tiling = False
  assert pipeline.load_components(config).decode_steps((1, NUM_LATENT, 4, 6, 16)) == 2
  assert comps.encode_text(["a dog", ""], TEXT_LEN).shape == (2, TEXT_LEN, 32)
  # The stage's L_t for a converted checkpoint: largest L_t <= 502 with 3 L_t + 7 * 6 divisible by 8.
  assert pipeline.stage_text_len(config, comps.model_config) == 498
  bare = tmp_path / "bare"
  os.makedirs(bare / "transformer")
  config.checkpoint = str(bare)
  with pytest.raises(ValueError, match="no text_encoder: pass --config.text_encoder=DIR"):
    pipeline.load_components(config)
  config.text_encoder, config.vae = os.path.join(dst, "text_encoder"), str(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="vae directory .*nowhere' does not exist"):
    pipeline.load_components(config)
