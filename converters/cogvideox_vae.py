"""diffusers CogVideoX `vae/` (safetensors) -> ttt-dit VAE directory (`config.json` + orbax `params/`).

Keys keep their diffusers names; conv weights go channels-last (conv3d [kt, kh, kw, I, O], conv2d
[kh, kw, I, O]). Every unknown key and every tensor of the wrong rank is reported together.

  python -m converters.cogvideox_vae --src SNAPSHOT/vae --dst OUT
"""
from __future__ import annotations

import json
import os
import re

import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from converters import common

KNOWN = re.compile(r"(encoder|decoder)\.(conv_in|conv_out|norm_out|mid_block|down_blocks|up_blocks)\..*"
                   r"\.(weight|bias)|(encoder|decoder)\.norm_out\.(weight|bias)")


def to_channels_last(key: str, x: np.ndarray) -> np.ndarray:
  """torch conv weight [O, I, *k] -> [*k, I, O]; everything else unchanged."""
  if key.endswith(".weight") and x.ndim in (4, 5):
    return np.ascontiguousarray(np.moveaxis(x, (0, 1), (-1, -2)))
  return x


def check_keys(snapshot: common.SafetensorsSnapshot, errors: common.ConversionErrors) -> None:
  """Records unknown keys and conv/norm tensors whose rank is not the one diffusers uses."""
  for key in snapshot.keys():
    if not KNOWN.fullmatch(key):
      errors.add_unknown(key)
      continue
    nd = len(snapshot.shape(key))
    if key.endswith(".bias") and nd != 1:
      errors.add(f"{key}: expected a 1-D bias, got shape {snapshot.shape(key)}")
    if key.endswith(".weight") and ("conv" in key.split(".")[-2]) and nd not in (4, 5):
      errors.add(f"{key}: expected a 4-D/5-D conv weight, got shape {snapshot.shape(key)}")
    if key.endswith(".weight") and "norm" in key.split(".")[-2] and nd != 1:
      errors.add(f"{key}: expected a 1-D norm weight, got shape {snapshot.shape(key)}")


def convert_vae(src_vae_dir: str, dst_dir: str, dtype: str = "float32", overwrite: bool = False) -> None:
  """Converts a diffusers AutoencoderKLCogVideoX folder into `dst_dir`."""
  cfg_path = os.path.join(src_vae_dir, "config.json")
  if not os.path.exists(cfg_path):
    raise ValueError(f"{src_vae_dir}: no config.json")
  with open(cfg_path) as f:
    config = json.load(f)
  errors = common.ConversionErrors(src_vae_dir)
  snapshot = common.SafetensorsSnapshot(src_vae_dir, errors)
  check_keys(snapshot, errors)
  for required in ("encoder.conv_in.conv.weight", "decoder.conv_in.conv.weight", "decoder.conv_out.conv.weight",
                   "encoder.conv_out.conv.weight"):
    if required not in snapshot.keys():
      errors.add_missing(required)
  errors.raise_if_any()
  dt = common.parse_dtype(dtype)
  flat = {k: to_channels_last(k, snapshot.get(k)).astype(dt) for k in tqdm(snapshot.keys(), desc="vae", unit="tensor")}
  with common.atomic_directory(dst_dir, overwrite=overwrite) as tmp:
    common.save_orbax(os.path.join(tmp, "params"), common.unflatten(flat))
    common.write_json(os.path.join(tmp, "config.json"), config)


def main(argv):
  del argv
  convert_vae(flags.FLAGS.src, flags.FLAGS.dst, flags.FLAGS.dtype, flags.FLAGS.overwrite)
  logging.info("done: %s", flags.FLAGS.dst)


if __name__ == "__main__":
  flags.DEFINE_string("src", None, "diffusers vae/ folder")
  flags.DEFINE_string("dst", None, "output directory")
  flags.DEFINE_string("dtype", "float32", "stored dtype")
  flags.DEFINE_bool("overwrite", False, "replace an existing DST")
  flags.mark_flags_as_required(["src", "dst"])
  app.run(main)
