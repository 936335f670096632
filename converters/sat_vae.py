"""SAT CogVideoX VAE checkpoint (`torch.save({"state_dict": ...})`) -> ttt-dit VAE directory.

SAT names are mapped to diffusers names (spec §7.6), `loss.*` dropped, then written as
`converters.cogvideox_vae` does. torch is imported lazily, only here.

  python -m converters.sat_vae --src vae.pt --config vae/config.json --dst OUT
"""
from __future__ import annotations

import json
import os
import re

import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from converters import common
from converters.cogvideox_vae import check_keys, to_channels_last

DIFFUSERS_CONFIG = {  # CogVideoX 1.0 VAE (spec §7.1); used when no config json is given
    "_class_name": "AutoencoderKLCogVideoX", "in_channels": 3, "out_channels": 3, "latent_channels": 16,
    "block_out_channels": [128, 256, 256, 512], "layers_per_block": 3, "norm_num_groups": 32,
    "temporal_compression_ratio": 4, "scaling_factor": 0.7, "act_fn": "silu"}


def sat_to_diffusers(key: str, num_up: int) -> str | None:
  """Maps one SAT key to its diffusers name (None for dropped `loss.*` keys)."""
  if key.startswith("loss."):
    return None
  key = re.sub(r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2.", key)
  key = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", key)
  key = re.sub(r"^(encoder|decoder)\.mid\.block_(\d)\.",
               lambda m: f"{m.group(1)}.mid_block.resnets.{int(m.group(2)) - 1}.", key)
  key = re.sub(r"^decoder\.up\.(\d+)\.block\.(\d+)\.",
               lambda m: f"decoder.up_blocks.{num_up - 1 - int(m.group(1))}.resnets.{m.group(2)}.", key)
  key = re.sub(r"^decoder\.up\.(\d+)\.upsample\.",
               lambda m: f"decoder.up_blocks.{num_up - 1 - int(m.group(1))}.upsamplers.0.", key)
  return key.replace("nin_shortcut", "conv_shortcut")


class _DictSnapshot:
  """The `keys()`/`shape()` view of an in-memory state dict that `check_keys` needs."""

  def __init__(self, tensors: dict[str, np.ndarray]):
    self.tensors = tensors

  def keys(self) -> list[str]:
    return sorted(self.tensors)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self.tensors[key].shape)


def convert_sat_vae(src_path: str, dst_dir: str, config: dict | None = None, dtype: str = "float32",
                    overwrite: bool = False) -> None:
  """Converts a SAT VAE torch checkpoint into `dst_dir` (config: diffusers-style VAE config dict)."""
  import torch  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(src_path):
    raise ValueError(f"{src_path}: no such checkpoint file")
  blob = torch.load(src_path, map_location="cpu", weights_only=True)
  if not isinstance(blob, dict) or "state_dict" not in blob:
    raise ValueError(f"{src_path}: expected a dict with a 'state_dict' entry")
  config = dict(DIFFUSERS_CONFIG if config is None else config)
  num_up = len(config["block_out_channels"])
  tensors = {}
  for key, value in blob["state_dict"].items():
    new = sat_to_diffusers(key, num_up)
    if new is not None:
      tensors[new] = value.float().numpy() if value.dtype == torch.bfloat16 else value.numpy()
  errors = common.ConversionErrors(src_path)
  check_keys(_DictSnapshot(tensors), errors)
  for required in ("encoder.conv_in.conv.weight", "decoder.conv_in.conv.weight", "decoder.conv_out.conv.weight",
                   "encoder.conv_out.conv.weight"):
    if required not in tensors:
      errors.add_missing(required)
  errors.raise_if_any()
  dt = common.parse_dtype(dtype)
  flat = {k: to_channels_last(k, v).astype(dt) for k, v in tqdm(sorted(tensors.items()), desc="sat vae")}
  with common.atomic_directory(dst_dir, overwrite=overwrite) as tmp:
    common.save_orbax(os.path.join(tmp, "params"), common.unflatten(flat))
    common.write_json(os.path.join(tmp, "config.json"), config)


def main(argv):
  del argv
  f = flags.FLAGS
  config = None
  if f.config:
    with open(f.config) as fh:
      config = json.load(fh)
  convert_sat_vae(f.src, f.dst, config, f.dtype, f.overwrite)
  logging.info("done: %s", f.dst)


if __name__ == "__main__":
  flags.DEFINE_string("src", None, "SAT VAE checkpoint (torch.save file with 'state_dict')")
  flags.DEFINE_string("config", None, "diffusers-style VAE config.json (default: CogVideoX 1.0)")
  flags.DEFINE_string("dst", None, "output directory")
  flags.DEFINE_string("dtype", "float32", "stored dtype")
  flags.DEFINE_bool("overwrite", False, "replace an existing DST")
  flags.mark_flags_as_required(["src", "dst"])
  app.run(main)
