"""Converts official ttt-video-dit (PyTorch) checkpoints into ttt-dit orbax checkpoints.

    python -m converters.ttt_video_dit --src FILE_OR_DIR --dst DIR [--ttt_ln_eps 1e-6]
        [--eta_mode official] [--dtype float32|bfloat16] [--mini_batch_size N] [--overwrite]

Sources (the architecture is inferred from tensor names and shapes, `converters.official_names`):
- a state_dict as `.safetensors` (or a folder with one file / an index json),
- a `torch.save` file (`.pt`/`.pth`/`.bin`), possibly nested (e.g. `{"model": state_dict}`),
- a torch.distributed.checkpoint (DCP) directory (has a `.metadata` file): either the converted weights
  that the official `from_hf.py` writes (keys `dit.*`) or a training checkpoint (keys `model.dit.*` next
  to `optimizer.*`, `lr_scheduler.*`, `data_module.*`, `metadata.*`, which are skipped). Read in one
  process, one tensor at a time.
torch is only imported for `.pt` and DCP sources. Output: `DIR/transformer` (orbax + config json, the
layout of `ttt_dit.model.loading`), written under a temporary name and renamed into place when complete.
Defaults reproduce the official runs: all LayerNorm eps 1e-6, ttt_ln_eps 1e-6, eta_mode "official".
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags, logging

from converters import common, official_names
from converters.official_names import PREFIX

Shape = tuple[int, ...]

# Sections of an official *training* DCP checkpoint that are not model weights (ttt/infra/checkpoint.py).
TRAINING_STATE_SECTIONS = ("optimizer", "lr_scheduler", "data_module", "metadata")


# ----------------------------------------------------------------------------------------------------
# Tensor sources: keys() / shape(key) / get(key) -> numpy, one tensor at a time
# ----------------------------------------------------------------------------------------------------


def torch_to_numpy(t: Any) -> np.ndarray:
  """A CPU torch tensor -> numpy with the same dtype (bfloat16 as ml_dtypes.bfloat16), no rounding."""
  import torch
  t = t.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(common.DTYPES["bfloat16"])
  return t.numpy()


def _flatten_nested(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dicts of tensors -> {dotted key: leaf} (the DCP flattening of nested state dicts)."""
  out: dict[str, Any] = {}
  for k, v in tree.items():
    key = f"{prefix}.{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(_flatten_nested(v, key))
    else:
      out[key] = v
  return out


class TorchSaveSource:
  """A `torch.save` file of a (possibly nested) state dict, memory-mapped (weights_only)."""

  def __init__(self, path: str):
    import torch
    self.path = path
    try:
      try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
      except RuntimeError as e:  # legacy (non-zip) torch.save files cannot be memory-mapped
        if "mmap" not in str(e):
          raise
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError for bad files.
      raise ValueError(f"{path}: cannot read torch.save file: {e}") from e
    if not isinstance(obj, Mapping):
      raise ValueError(f"{path}: expected a (nested) dict of tensors, got {type(obj).__name__}")
    leaves = _flatten_nested(obj)
    self._tensors = {k: v for k, v in leaves.items() if isinstance(v, torch.Tensor)}
    self.non_tensors = sorted(k for k, v in leaves.items() if not isinstance(v, torch.Tensor))

  def keys(self) -> list[str]:
    return sorted(self._tensors)

  def shape(self, key: str) -> Shape:
    return tuple(self._tensors[key].shape)

  def get(self, key: str) -> np.ndarray:
    return torch_to_numpy(self._tensors[key])


def is_dcp_dir(path: str) -> bool:
  """True for a torch.distributed.checkpoint directory (it has a `.metadata` file)."""
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, ".metadata"))


class DCPSource:
  """A torch.distributed.checkpoint directory read in one process, one tensor per `dcp.load` call."""

  def __init__(self, path: str):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    self.path = path
    try:
      meta = FileSystemReader(path).read_metadata()
    except Exception as e:
      raise ValueError(f"{path}: cannot read DCP metadata: {e}") from e
    self._meta = {k: v for k, v in meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    self.non_tensors = sorted(k for k in meta.state_dict_metadata if k not in self._meta)
    self._check_storage(meta.storage_data)
    self._reader = FileSystemReader(path)

  def _check_storage(self, storage_data: Mapping[Any, Any]) -> None:
    """Refuses missing or truncated `.distcp` files, naming every tensor whose bytes are not all there."""
    sizes: dict[str, int] = {}
    bad: dict[str, str] = {}
    for index, info in storage_data.items():
      file = getattr(info, "relative_path", None)
      if file is None:
        continue
      if file not in sizes:
        full = os.path.join(self.path, file)
        sizes[file] = os.path.getsize(full) if os.path.isfile(full) else -1
      if sizes[file] < 0:
        bad[index.fqn] = f"{file} is missing"
      elif info.offset + info.length > sizes[file]:
        bad[index.fqn] = f"bytes {info.offset}..{info.offset + info.length} beyond the end of {file} ({sizes[file]} bytes)"
    if bad:
      raise ValueError(f"{self.path}: truncated or incomplete DCP checkpoint: {len(bad)} tensor(s) unreadable:\n"
                       + "\n".join(f"  - {k}: {why}" for k, why in sorted(bad.items())))

  def keys(self) -> list[str]:
    return sorted(self._meta)

  def shape(self, key: str) -> Shape:
    return tuple(self._meta[key].size)

  def get(self, key: str) -> np.ndarray:
    import torch
    import torch.distributed.checkpoint as dcp
    m = self._meta[key]
    t = torch.empty(tuple(m.size), dtype=m.properties.dtype)
    try:
      dcp.load({key: t}, storage_reader=self._reader, no_dist=True)
    except Exception as e:  # missing / truncated shard files
      raise ValueError(f"{self.path}: cannot read tensor {key}: {e}") from e
    return torch_to_numpy(t)


class RenamedSource:
  """A view of another source under official names: {new key: source key}."""

  def __init__(self, source: Any, names: Mapping[str, str]):
    self.source, self.names, self.path = source, dict(names), source.path

  def keys(self) -> list[str]:
    return sorted(self.names)

  def shape(self, key: str) -> Shape:
    return self.source.shape(self.names[key])

  def get(self, key: str) -> np.ndarray:
    return self.source.get(self.names[key])


def official_view(source: Any) -> RenamedSource:
  """Keys of a source -> official `dit.*` names: strips a `model.` section (training checkpoints, whose
  other sections are skipped) and adds `dit.` when the state dict is the bare DiT's."""
  keys = source.keys()
  if any(k.startswith("model." + PREFIX) for k in keys):
    skipped = [k for k in keys if not k.startswith("model.")]
    bad = [k for k in skipped if k.split(".")[0] not in TRAINING_STATE_SECTIONS]
    if skipped:
      logging.info("%s: skipping %d non-model tensors (training state)", source.path, len(skipped) - len(bad))
    names = {k[len("model."):]: k for k in keys if k.startswith("model.")}
    names.update({k: k for k in bad})  # reported as unknown by the planner
    return RenamedSource(source, names)
  if not any(k.startswith(PREFIX) for k in keys) and "transformer_norm.weight" in keys:
    return RenamedSource(source, {PREFIX + k: k for k in keys})  # a bare `model.dit.state_dict()`
  return RenamedSource(source, {k: k for k in keys})


def open_source(path: str) -> RenamedSource:
  """Opens any supported official checkpoint (see module doc) as a source with official names."""
  if not os.path.exists(path):
    raise ValueError(f"{path}: no such file or directory")
  if is_dcp_dir(path):
    source: Any = DCPSource(path)
  elif os.path.isfile(path) and path.endswith((".pt", ".pth", ".bin", ".ckpt")):
    source = TorchSaveSource(path)
  elif path.endswith(".safetensors") or os.path.isdir(path):
    source = common.SafetensorsSnapshot(path)
  else:
    raise ValueError(f"{path}: unknown checkpoint format (expected .safetensors, .pt/.pth/.bin, or a DCP "
                     f"directory with a .metadata file)")
  return official_view(source)


# ----------------------------------------------------------------------------------------------------
# Config and conversion
# ----------------------------------------------------------------------------------------------------


def model_config(arch: official_names.Architecture, *, ttt_ln_eps: float = 1e-6, eta_mode: str = "official",
                 mini_batch_size: int | None = None) -> ml_collections.ConfigDict:
  """ttt-dit model config of an inferred official architecture (official eps 1e-6 everywhere)."""
  from ttt_dit.model.configs import get_config, validate_config
  c = get_config("5B", arch.sequence_layer, "3s")
  c.preset = "official"
  c.num_layers, c.model_dim, c.num_heads = arch.num_layers, arch.model_dim, arch.num_heads
  c.text_dim, c.time_embed_dim, c.mlp_ratio = arch.text_dim, arch.time_embed_dim, arch.mlp_ratio
  c.in_channels, c.out_channels, c.patch_size = arch.in_channels, arch.out_channels, arch.patch_size
  c.layer_norm_eps = 1e-6
  c.qk_norm_eps = 1e-6
  c.ttt_post_norm_eps = 1e-6
  c.ttt_ln_eps = float(ttt_ln_eps)
  c.eta_mode = eta_mode
  if mini_batch_size is not None:
    c.mini_batch_size = int(mini_batch_size)
  validate_config(c)
  return c


def convert_transformer(src: str, dst_transformer: str, *, ttt_ln_eps: float = 1e-6, eta_mode: str = "official",
                        dtype: str | None = None, mini_batch_size: int | None = None,
                        spill_to_disk: bool = True) -> ml_collections.ConfigDict:
  """Official checkpoint -> orbax checkpoint + config json at `dst_transformer` (all checks before any write).

  `dtype` None keeps every tensor's stored dtype (bit-exact); otherwise all are cast to it.
  """
  from ttt_dit.model import loading
  source = open_source(src)
  arch = official_names.infer_architecture({k: source.shape(k) for k in source.keys()}, where=src)
  logging.info("%s: inferred %s", src, arch)
  config = model_config(arch, ttt_ln_eps=ttt_ln_eps, eta_mode=eta_mode, mini_batch_size=mini_batch_size)
  expected = loading.expected_shapes(config)
  plan = common.plan_conversion(source, official_names.rules(), expected)
  np_dtype = None if dtype is None else common.parse_dtype(dtype)
  with common.staged_tensors(dst_transformer, spill_to_disk) as (flat, keep):
    from tqdm import tqdm
    for key in tqdm(list(plan.items), desc="official -> flax", unit="tensor"):
      target, transform = plan.items[key]
      x = common.TRANSFORMS[transform](source.get(key))
      if tuple(x.shape) != tuple(expected[target]):  # the data disagrees with the header/metadata
        raise ValueError(f"{src}: tensor {key} has shape {x.shape} on read, expected {expected[target]}")
      flat[target] = keep(x if np_dtype is None else x.astype(np_dtype, copy=False))
    loading.write_dit_checkpoint(dst_transformer, flat, config)
  return config


def convert(src: str, dst: str, *, overwrite: bool = False, **kwargs: Any) -> ml_collections.ConfigDict:
  """Converts `src` into `dst/transformer`; `dst` appears only when complete."""
  with common.atomic_directory(dst, overwrite=overwrite) as tmp:
    return convert_transformer(src, os.path.join(tmp, "transformer"), **kwargs)


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags of `python -m converters.ttt_video_dit`."""
  flags.DEFINE_string("src", None, "Official checkpoint: .safetensors, .pt, or DCP directory.", required=True)
  flags.DEFINE_string("dst", None, "Output directory (DIR/transformer).", required=True)
  flags.DEFINE_float("ttt_ln_eps", 1e-6, "Inner-loop LayerNorm eps (1e-6 kernels = official runs; 1e-8 PyTorch).")
  flags.DEFINE_enum("eta_mode", "official", ["official", "per_token"], "TTT learning-rate row mode (spec §4.2).")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16", "float64"],
                    "Stored parameter dtype (default: keep the source dtypes).")
  flags.DEFINE_integer("mini_batch_size", None, "TTT mini-batch size (default: the preset's).")
  flags.DEFINE_bool("overwrite", False, "Replace an existing --dst.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  convert(FLAGS.src, FLAGS.dst, overwrite=FLAGS.overwrite, ttt_ln_eps=FLAGS.ttt_ln_eps, eta_mode=FLAGS.eta_mode,
          dtype=FLAGS.dtype, mini_batch_size=FLAGS.mini_batch_size)


if __name__ == "__main__":
  define_flags()
  app.run(main)
