"""A tiny random diffusers AutoencoderKLCogVideoX and its converted directory, shared by tests/vae."""
import pytest
import torch
from diffusers import AutoencoderKLCogVideoX

from converters.cogvideox_vae import convert_vae


@pytest.fixture(scope="session")
def vae_dirs(tmp_path_factory):
  """(root, float64 diffusers model): root/src is the diffusers folder, root/dst the float64 conversion."""
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
