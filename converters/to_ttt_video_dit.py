"""Writes a ttt-dit checkpoint as an official ttt-video-dit PyTorch state_dict (`.safetensors`).

    python -m converters.to_ttt_video_dit --src DIR --dst FILE.safetensors [--dtype bfloat16] [--overwrite]

Keys are exactly those of the official `CogVideoX.state_dict()` (prefix `dit.`, spec §2.8/§3.1), mapped
through the same table as the reader (`converters.official_names`). Load it in the PyTorch code with
`model.load_state_dict(safetensors.torch.load_file(FILE), strict=True)` (or `torch_save_to_dcp` it).
No torch needed: the safetensors file is written directly, one tensor at a time, to a temporary name
that is renamed into place when complete. Without `--dtype` each tensor keeps its stored dtype, so
official -> ttt-dit -> official is bit-exact.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from converters import common, official_names

SAFETENSORS_DTYPES: dict[np.dtype, str] = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    common.DTYPES["bfloat16"]: "BF16",
}


def to_official(flat: Mapping[str, np.ndarray], config: Any) -> dict[str, tuple[str, str, tuple[int, ...]]]:
  """{Flax path: (official key, transform, official shape)} for every parameter; ValueError naming any gap."""
  names = official_names.official_names(flat)
  out = {}
  for path, (name, transform) in names.items():
    shape = tuple(flat[path].shape)
    if transform == "transpose":
      shape = shape[::-1]
    elif transform == "conv2d_to_dense":  # dense [C*p*p, D] -> conv [D, C, p, p]
      shape = (shape[1], int(config.in_channels), int(config.patch_size), int(config.patch_size))
      if shape[1] * shape[2] * shape[3] != flat[path].shape[0]:
        raise ValueError(f"{path}: dense kernel {flat[path].shape} does not fit in_channels {config.in_channels} "
                         f"x patch {config.patch_size}^2")
    out[path] = (name, transform, shape)
  return out


def write_safetensors(dst: str, tensors: Mapping[str, tuple[tuple[int, ...], np.dtype]], produce,
                      metadata: Mapping[str, str] | None = None) -> None:
  """Streams a safetensors file: header from {key: (shape, dtype)}, then `produce(key)` one tensor at a time.

  Written to a temporary sibling and renamed onto `dst` only when complete.
  """
  keys = sorted(tensors)
  header: dict[str, Any] = {}
  offset = 0
  for key in keys:
    shape, dtype = tensors[key]
    if np.dtype(dtype) not in SAFETENSORS_DTYPES:
      raise ValueError(f"{key}: dtype {dtype} cannot be written to safetensors")
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[key] = {"dtype": SAFETENSORS_DTYPES[np.dtype(dtype)], "shape": list(shape),
                   "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  if metadata:
    header["__metadata__"] = dict(metadata)
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  dst = os.path.abspath(dst)
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(dst) + ".tmp-", dir=os.path.dirname(dst))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(len(raw).to_bytes(8, "little"))
      f.write(raw)
      for key in tqdm(keys, desc="flax -> official", unit="tensor"):
        shape, dtype = tensors[key]
        x = np.ascontiguousarray(produce(key))
        if tuple(x.shape) != tuple(shape) or x.dtype != np.dtype(dtype):
          raise ValueError(f"internal: {key} produced {x.shape} {x.dtype}, header says {shape} {dtype}")
        f.write(x.astype(x.dtype.newbyteorder("<"), copy=False).tobytes())
    os.replace(tmp, dst)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  logging.info("wrote %s", dst)


def convert(src: str, dst: str, *, dtype: str | None = None, overwrite: bool = False) -> list[str]:
  """ttt-dit checkpoint DIR (or DIR/transformer) -> official state_dict safetensors; returns the keys written."""
  from ttt_dit.model import loading
  if os.path.exists(dst) and not overwrite:
    raise ValueError(f"{dst}: already exists (pass overwrite to replace it)")
  if not dst.endswith(".safetensors"):
    raise ValueError(f"{dst}: expected a .safetensors file name")
  config = loading.load_config(src)
  flat = loading.load_orbax_flat(src)
  expected = loading.expected_shapes(config)
  common.check_stored(src, {p: x.shape for p, x in flat.items()}, expected)
  for field in ("layer_norm_eps", "qk_norm_eps", "ttt_post_norm_eps"):
    if float(config[field]) != 1e-6:
      logging.warning("%s = %g, but the official model uses 1e-6: outputs will differ slightly", field, config[field])
  mapping = to_official(flat, config)
  by_key = {name: (path, transform, shape) for path, (name, transform, shape) in mapping.items()}
  np_dtype = None if dtype is None else common.parse_dtype(dtype)
  specs = {name: (shape, np.dtype(flat[path].dtype) if np_dtype is None else np_dtype)
           for name, (path, _, shape) in by_key.items()}

  def produce(name: str) -> np.ndarray:
    path, transform, shape = by_key[name]
    x = common.invert_transform(transform, np.asarray(flat.pop(path)), shape)
    return x if np_dtype is None else x.astype(np_dtype)

  write_safetensors(dst, specs, produce, metadata={"format": "pt", "source": "ttt-dit"})
  return sorted(by_key)


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags of `python -m converters.to_ttt_video_dit`."""
  flags.DEFINE_string("src", None, "ttt-dit checkpoint directory (DIR or DIR/transformer).", required=True)
  flags.DEFINE_string("dst", None, "Output .safetensors file (official state_dict names).", required=True)
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16", "float64"],
                    "Stored dtype (default: keep the checkpoint's dtypes).")
  flags.DEFINE_bool("overwrite", False, "Replace an existing --dst.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  convert(FLAGS.src, FLAGS.dst, dtype=FLAGS.dtype, overwrite=FLAGS.overwrite)


if __name__ == "__main__":
  define_flags()
  app.run(main)
