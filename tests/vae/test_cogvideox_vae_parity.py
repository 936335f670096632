"""CogVideoX VAE + converter against diffusers.AutoencoderKLCogVideoX (tiny, random weights, float64).

`vae_dirs` (tests/vae/conftest.py): the diffusers model and its converted directory.
"""
import numpy as np
import pytest
import torch

from converters.cogvideox_vae import convert_vae
from ttt_dit.vae.cogvideox_vae import load_vae, windows


def test_windows_official_rule():
  assert windows(13, 2) == [(0, 3)] + [(3 + 2 * i, 5 + 2 * i) for i in range(5)]
  assert windows(1, 2) == [(0, 1)] and windows(7, 2) == [(0, 3), (3, 5), (5, 7)]


@pytest.mark.parametrize("t", [1, 3, 5, 7])
def test_decode_parity(vae_dirs, x64, t):
  root, model = vae_dirs
  vae = load_vae(str(root / "dst"), dtype=np.float64)
  z = np.random.default_rng(t).normal(size=(1, t, 2, 2, 4))
  got = np.asarray(vae.decode(z))
  with torch.no_grad():
    want = model.decode(torch.tensor(z).permute(0, 4, 1, 2, 3)).sample.permute(0, 2, 3, 4, 1).numpy()
  assert got.shape == want.shape, (got.shape, want.shape)
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-6


@pytest.mark.parametrize("frames", [9, 17])  # one window; two windows (9 then 8, conv caches carried)
def test_encode_parity(vae_dirs, x64, frames):
  root, model = vae_dirs
  vae = load_vae(str(root / "dst"), dtype=np.float64, sample_window=8)  # diffusers' encode window
  x = np.random.default_rng(0).uniform(-1, 1, size=(1, frames, 16, 16, 3))
  mean, logvar = vae.encode(x)
  with torch.no_grad():
    dist = model.encode(torch.tensor(x).permute(0, 4, 1, 2, 3)).latent_dist
  for got, want in ((mean, dist.mean), (logvar, dist.logvar)):
    want = want.permute(0, 2, 3, 4, 1).numpy()
    got = np.asarray(got)
    assert got.shape == want.shape == (1, (frames - 1) // 4 + 1, 2, 2, 4)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-6


def test_bad_checkpoint_names_tensors(vae_dirs, tmp_path):
  root, _ = vae_dirs
  from safetensors.numpy import load_file, save_file
  src = tmp_path / "bad"
  src.mkdir()
  (src / "config.json").write_text((root / "src" / "config.json").read_text())
  tensors = load_file(str(root / "src" / "diffusion_pytorch_model.safetensors"))
  tensors["encoder.bogus.weight"] = np.zeros((2,), np.float32)
  tensors["decoder.conv_in.conv.bias"] = np.zeros((2, 2), np.float32)
  del tensors["decoder.conv_out.conv.weight"]
  save_file(tensors, str(src / "diffusion_pytorch_model.safetensors"))
  with pytest.raises(ValueError) as e:
    convert_vae(str(src), str(tmp_path / "out"))
  for name in ("encoder.bogus.weight", "decoder.conv_in.conv.bias", "decoder.conv_out.conv.weight"):
    assert name in str(e.value)
  assert not (tmp_path / "out").exists()


def _diffusers_to_sat(key: str, num_up: int) -> str:
  """Test-side inverse of spec §7.6 (written independently of the converter's regexes)."""
  parts = key.split(".")
  if parts[1] == "down_blocks":
    kind = "block" if parts[3] == "resnets" else "downsample"
    rest = parts[4:] if kind == "block" else parts[5:]
    head = [parts[0], "down", parts[2], kind] + ([parts[4]] if kind == "block" else [])
    parts = head + (rest[1:] if kind == "block" else rest)
  elif parts[1] == "up_blocks":
    i = str(num_up - 1 - int(parts[2]))
    if parts[3] == "resnets":
      parts = [parts[0], "up", i, "block", parts[4]] + parts[5:]
    else:
      parts = [parts[0], "up", i, "upsample"] + parts[5:]
  elif parts[1] == "mid_block":
    parts = [parts[0], "mid", f"block_{int(parts[3]) + 1}"] + parts[4:]
  return ".".join(parts).replace("conv_shortcut", "nin_shortcut")


def test_sat_converter_matches_diffusers_converter(vae_dirs, tmp_path):
  from converters.common import flatten, load_orbax
  from converters.sat_vae import convert_sat_vae
  import json
  root, model = vae_dirs
  sd = {_diffusers_to_sat(k, 4): v.float() for k, v in model.state_dict().items()}
  sd["loss.logvar"] = torch.zeros(1)
  assert "decoder.up.3.block.0.norm1.conv_y.conv.weight" in sd and "encoder.mid.block_2.conv1.conv.weight" in sd
  torch.save({"state_dict": sd}, str(tmp_path / "vae.pt"))
  config = json.loads((root / "src" / "config.json").read_text())
  convert_sat_vae(str(tmp_path / "vae.pt"), str(tmp_path / "sat"), config, dtype="float64")
  got = flatten(load_orbax(str(tmp_path / "sat" / "params")))
  want = flatten(load_orbax(str(root / "dst" / "params")))
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-7, err_msg=k)
  del sd["encoder.conv_in.conv.weight"]
  sd["encoder.down.0.bogus.weight"] = torch.zeros(3)
  torch.save({"state_dict": sd}, str(tmp_path / "bad.pt"))
  with pytest.raises(ValueError) as e:
    convert_sat_vae(str(tmp_path / "bad.pt"), str(tmp_path / "bad"), config)
  assert "encoder.down.0.bogus.weight" in str(e.value) and "encoder.conv_in.conv.weight" in str(e.value)
  assert not (tmp_path / "bad").exists()


def test_public_api_load_vae(vae_dirs):
  """ttt_dit.load_vae(path, dtype=...): encode -> (mean, logvar) [B, T', H/8, W/8, C]; decode -> [B, T, H, W, 3]."""
  import jax.numpy as jnp
  import ttt_dit
  root, _ = vae_dirs
  vae = ttt_dit.load_vae(str(root / "dst"), dtype=jnp.float32)
  x = np.random.default_rng(1).uniform(-1, 1, size=(2, 9, 16, 24, 3)).astype(np.float32)
  mean, logvar = vae.encode(x)
  assert mean.shape == logvar.shape == (2, 3, 2, 3, 4) and mean.dtype == jnp.float32
  assert float(jnp.max(logvar)) <= 20.0 and float(jnp.min(logvar)) >= -30.0
  video = vae.decode(mean)
  assert video.shape == (2, 9, 16, 24, 3) and video.dtype == jnp.float32
  assert np.isfinite(np.asarray(video)).all()


# Spatial tiling: latents 10 x 12 in tiles of 6 x 5 latents (48 x 40 pixels), overlaps 1/6 and 1/5:
# rows start at 0, 5 and columns at 0, 4, 8, so both blends and the partial last tiles are exercised.
TILING = dict(tile_height=48, tile_width=40, overlap_height=1 / 6, overlap_width=1 / 5)


def test_tiled_decode_matches_diffusers_tiled_decode(vae_dirs, x64):
  from ttt_dit.vae.cogvideox_vae import Tiling
  root, model = vae_dirs
  vae = load_vae(str(root / "dst"), dtype=np.float64, tiling=Tiling(**TILING))
  z = np.random.default_rng(3).normal(size=(1, 3, 10, 12, 4))
  assert vae.num_decode_steps(z.shape) == 6
  got = np.asarray(vae.decode(z))
  model.enable_tiling(tile_sample_min_height=48, tile_sample_min_width=40, tile_overlap_factor_height=1 / 6,
                      tile_overlap_factor_width=1 / 5)
  try:
    with torch.no_grad():
      want = model.decode(torch.tensor(z).permute(0, 4, 1, 2, 3)).sample.permute(0, 2, 3, 4, 1).numpy()
  finally:
    model.disable_tiling()
  assert got.shape == want.shape == (1, 9, 80, 96, 3)
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-6


def test_tiled_equals_untiled_for_a_pointwise_decoder(vae_dirs):
  """Zero GroupNorm gains and spatial centre taps only: the decoder is pointwise in space, GroupNorm
  statistics no longer matter, so tiling must give the untiled result (tile placement, blend, crop)."""
  from converters.common import flatten, load_orbax
  from ttt_dit.vae.cogvideox_vae import CogVideoXVAE, Tiling
  import json
  root, _ = vae_dirs
  config = json.loads((root / "dst" / "config.json").read_text())
  p = {k: np.asarray(v, np.float32) for k, v in flatten(load_orbax(str(root / "dst" / "params"))).items()}
  for k, w in p.items():
    if k.endswith("norm_layer.weight"):
      p[k] = np.zeros_like(w)
    elif k.endswith(".weight") and w.ndim in (4, 5) and w.shape[-3] == 3:  # [(kt,) kh, kw, I, O]
      centre = np.zeros_like(w)
      centre[..., 1, 1, :, :] = w[..., 1, 1, :, :]
      p[k] = centre
  z = np.random.default_rng(4).normal(size=(1, 3, 10, 12, 4)).astype(np.float32)
  untiled = np.asarray(CogVideoXVAE(p, config).decode(z))
  tiled = np.asarray(CogVideoXVAE(p, config, tiling=Tiling(**TILING)).decode(z))
  assert untiled.shape == tiled.shape == (1, 9, 80, 96, 3) and untiled.std() > 0.01
  np.testing.assert_allclose(tiled, untiled, rtol=0, atol=1e-5 * np.abs(untiled).max())


def test_tiling_plan_defaults_and_bad_settings(vae_dirs):
  from ttt_dit.vae.cogvideox_vae import Tiling, _plan_axis
  t = Tiling()  # diffusers' CogVideoX defaults: 720x480 -> 3 x 3 tiles of 240x360 pixels
  h, w = _plan_axis(60, t.tile_height, t.overlap_height, 8, "height"), _plan_axis(90, t.tile_width, t.overlap_width, 8, "width")
  assert (h.tile, h.starts, h.blend, h.limit) == (30, (0, 25, 50), 40, 200)
  assert (w.tile, w.starts, w.blend, w.limit) == (45, (0, 36, 72), 72, 288)
  root, _ = vae_dirs
  vae = load_vae(str(root / "dst"), dtype=np.float32, tiling=Tiling(tile_height=48, tile_width=48, overlap_height=0.3))
  with pytest.raises(ValueError, match="tile_height 48 with overlap 0.3 covers"):
    vae.decode(np.zeros((1, 1, 10, 12, 4), np.float32))
  assert vae.num_decode_steps((1, 13, 6, 6, 4)) == 6  # fits in one tile: untiled, 6 windows
