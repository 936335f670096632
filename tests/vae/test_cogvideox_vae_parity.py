"""CogVideoX VAE + converter against diffusers.AutoencoderKLCogVideoX (tiny, random weights, float64)."""
import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLCogVideoX

from converters.cogvideox_vae import convert_vae
from ttt_dit.vae.cogvideox_vae import load_vae, windows


@pytest.fixture
def x64():
  old = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", old)


@pytest.fixture(scope="module")
def vae_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("vae")
  torch.manual_seed(0)
  model = AutoencoderKLCogVideoX(
      down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
      block_out_channels=(8, 8, 16, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4,
      temporal_compression_ratio=4, sample_height=16, sample_width=16).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(str(root / "src"))
  convert_vae(str(root / "src"), str(root / "dst"), dtype="float64")
  return root, model.double()


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
  vae = load_vae(str(root / "dst"), dtype=np.float64)
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
