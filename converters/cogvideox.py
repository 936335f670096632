"""Converts a diffusers CogVideoX-5b snapshot into ttt-dit orbax checkpoints (spec §9).

    python -m converters.cogvideox --src SNAPSHOT --dst DIR [--sequence_layer ttt_mlp|ttt_linear|none]
        [--seed 0] [--dtype bfloat16|float32]

SNAPSHOT is the folder as published (`transformer/config.json`, `diffusion_pytorch_model*.safetensors`
and the index json when sharded; optionally `vae/`, `text_encoder/`, `tokenizer/`). Writes
`DIR/transformer` (and `DIR/vae`, `DIR/text_encoder` when those converters are available). No torch:
safetensors are read one tensor at a time. TTT parameters, which diffusers lacks, are initialised as
the official converter did (spec §9.2) from `--seed`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx
from tqdm import tqdm

from converters import common
from converters.common import Rule

# diffusers key -> NNX path (spec §9.1 table, with the NNX attribute names of ttt_dit.model.dit).
RULES: tuple[Rule, ...] = (
    Rule(r"patch_embed\.proj\.weight", "patch_embedding.vid_proj.kernel", "conv2d_to_dense"),
    Rule(r"patch_embed\.proj\.bias", "patch_embedding.vid_proj.bias"),
    Rule(r"patch_embed\.text_proj\.weight", "patch_embedding.text_proj.kernel", "transpose"),
    Rule(r"patch_embed\.text_proj\.bias", "patch_embedding.text_proj.bias"),
    Rule(r"time_embedding\.linear_(?P<j>[12])\.weight", "time_embed.linear_{j}.kernel", "transpose"),
    Rule(r"time_embedding\.linear_(?P<j>[12])\.bias", "time_embed.linear_{j}.bias"),
    Rule(r"transformer_blocks\.(?P<i>\d+)\.norm1\.linear\.weight", "layers.{i}.pre_seq_adaLN_modulation.kernel",
         "transpose"),
    Rule(r"transformer_blocks\.(?P<i>\d+)\.norm1\.linear\.bias", "layers.{i}.pre_seq_adaLN_modulation.bias"),
    Rule(r"transformer_blocks\.(?P<i>\d+)\.norm1\.norm\.weight", "layers.{i}.pre_seq_layernorm.scale"),
    Rule(r"transformer_blocks\.(?P<i>\d+)\.norm1\.norm\.bias", "layers.{i}.pre_seq_layernorm.bias"),
    Rule(r"transformer_blocks\.(?P<i>\d+)\.attn1\.to_(?P<p>[qkv])\.weight",
         "layers.{i}.seq_modeling_block.{p}.kernel", "transpose"),
    Rule(r"transformer_blocks\.(?P<i>\d+)\.attn1\.to_(?P<p>[qkv])\.bias", "layers.{i}.seq_modeling_block.{p}.bias"),
    Rule(r"transformer_blocks\.(?P<i>\d+)\.attn1\.to_out\.0\.weight", "layers.{i}.seq_modeling_block.o.kernel",
         "transpose"),
    Rule(r"transformer_blocks\.(?P<i>\d+)\.attn1\.to_out\.0\.bias", "layers.{i}.seq_modeling_block.o.bias"),
    Rule(r"transformer_blocks\.(?P<i>\d+)\.attn1\.norm_(?P<p>[qk])\.weight",
         "layers.{i}.seq_modeling_block.{p}_norm.scale"),
    Rule(r"transformer_blocks\.(?P<i>\d+)\.attn1\.norm_(?P<p>[qk])\.bias",
         "layers.{i}.seq_modeling_block.{p}_norm.bias"),
    Rule(r"transformer_blocks\.(?P<i>\d+)\.norm2\.linear\.weight", "layers.{i}.pre_mlp_adaLN_modulation.kernel",
         "transpose"),
    Rule(r"transformer_blocks\.(?P<i>\d+)\.norm2\.linear\.bias", "layers.{i}.pre_mlp_adaLN_modulation.bias"),
    Rule(r"transformer_blocks\.(?P<i>\d+)\.norm2\.norm\.weight", "layers.{i}.pre_mlp_layernorm.scale"),
    Rule(r"transformer_blocks\.(?P<i>\d+)\.norm2\.norm\.bias", "layers.{i}.pre_mlp_layernorm.bias"),
    Rule(r"transformer_blocks\.(?P<i>\d+)\.ff\.net\.0\.proj\.weight", "layers.{i}.mlp.layer1.kernel", "transpose"),
    Rule(r"transformer_blocks\.(?P<i>\d+)\.ff\.net\.0\.proj\.bias", "layers.{i}.mlp.layer1.bias"),
    Rule(r"transformer_blocks\.(?P<i>\d+)\.ff\.net\.2\.weight", "layers.{i}.mlp.layer2.kernel", "transpose"),
    Rule(r"transformer_blocks\.(?P<i>\d+)\.ff\.net\.2\.bias", "layers.{i}.mlp.layer2.bias"),
    Rule(r"norm_final\.weight", "transformer_norm.scale"),
    Rule(r"norm_final\.bias", "transformer_norm.bias"),
    Rule(r"norm_out\.linear\.weight", "final_layer.adaLN_modulation.kernel", "transpose"),
    Rule(r"norm_out\.linear\.bias", "final_layer.adaLN_modulation.bias"),
    Rule(r"norm_out\.norm\.weight", "final_layer.norm.scale"),
    Rule(r"norm_out\.norm\.bias", "final_layer.norm.bias"),
    Rule(r"proj_out\.weight", "final_layer.linear.kernel", "transpose"),
    Rule(r"proj_out\.bias", "final_layer.linear.bias"),
)

# diffusers config.json keys: key -> required value (None: any value; used or irrelevant to the math).
_ANY = object()
CONFIG_REQUIREMENTS: dict[str, Any] = {
    "_class_name": "CogVideoXTransformer3DModel",
    "_diffusers_version": _ANY,
    "_name_or_path": _ANY,
    "num_attention_heads": _ANY,
    "attention_head_dim": _ANY,
    "in_channels": _ANY,
    "out_channels": _ANY,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "time_embed_dim": _ANY,
    "ofs_embed_dim": None,                      # CogVideoX 1.5 I2V offset embedding: not supported
    "text_embed_dim": _ANY,
    "num_layers": _ANY,
    "dropout": 0.0,
    "attention_bias": True,
    "sample_width": _ANY,                       # only used by learned / sincos position embeddings
    "sample_height": _ANY,
    "sample_frames": _ANY,
    "patch_size": _ANY,
    "patch_size_t": None,                       # CogVideoX 1.5 temporal patching: not supported
    "temporal_compression_ratio": _ANY,
    "max_text_seq_length": _ANY,                # the pipeline's T5 length; the DiT takes any length
    "activation_fn": "gelu-approximate",
    "timestep_activation_fn": "silu",
    "norm_elementwise_affine": True,
    "norm_eps": _ANY,
    "spatial_interpolation_scale": _ANY,        # only used by sincos position embeddings (2b)
    "temporal_interpolation_scale": _ANY,
    "use_rotary_positional_embeddings": True,   # CogVideoX-2b (sincos, no RoPE): not supported
    "use_learned_positional_embeddings": False,
    "patch_bias": True,
}

QK_NORM_EPS = 1e-6  # diffusers builds CogVideoX attention with eps=1e-6 regardless of norm_eps (spec §9.3)


def check_diffusers_config(cfg: Mapping[str, Any], where: str = "config.json") -> None:
  """Refuses configs with keys or values this converter does not understand (all problems at once)."""
  problems = []
  for key, value in sorted(cfg.items()):
    if key not in CONFIG_REQUIREMENTS:
      problems.append(f"unknown config key {key!r} (value {value!r})")
      continue
    want = CONFIG_REQUIREMENTS[key]
    if want is not _ANY and value != want:
      problems.append(f"unsupported {key} = {value!r} (expected {want!r})")
  for key in ("num_attention_heads", "attention_head_dim", "num_layers", "text_embed_dim", "time_embed_dim",
              "in_channels", "patch_size", "norm_eps"):
    if key not in cfg:
      problems.append(f"missing config key {key!r}")
  if not problems:
    if cfg.get("out_channels", cfg["in_channels"]) not in (None, cfg["in_channels"]):
      problems.append(f"out_channels {cfg['out_channels']} != in_channels {cfg['in_channels']}")
    if cfg["attention_head_dim"] % 16:
      problems.append(f"attention_head_dim {cfg['attention_head_dim']} is not a multiple of 16 (3D RoPE pairs)")
  if problems:
    raise ValueError(f"{where}: cannot convert this CogVideoX config:\n" + "\n".join(f"  - {p}" for p in problems))


def model_config(cfg: Mapping[str, Any], *, sequence_layer: str, attn_length: int = 12,
                 prefix_temporal_length: int = 1, mini_batch_size: int | None = None) -> ml_collections.ConfigDict:
  """ttt-dit model config for a diffusers CogVideoX config (eps from diffusers: norm_eps, q/k 1e-6)."""
  from ttt_dit.model.configs import get_config
  c = get_config("5B", sequence_layer, "3s")
  c.preset = "diffusers"
  c.num_heads = int(cfg["num_attention_heads"])
  c.model_dim = c.num_heads * int(cfg["attention_head_dim"])
  c.num_layers = int(cfg["num_layers"])
  c.text_dim = int(cfg["text_embed_dim"])
  c.time_embed_dim = int(cfg["time_embed_dim"])
  c.in_channels = int(cfg["in_channels"])
  c.out_channels = int(cfg.get("out_channels") or cfg["in_channels"])
  c.patch_size = int(cfg["patch_size"])
  c.latent_height = int(cfg.get("sample_height", 60)) // c.patch_size
  c.latent_width = int(cfg.get("sample_width", 90)) // c.patch_size
  c.layer_norm_eps = float(cfg["norm_eps"])
  c.qk_norm_eps = QK_NORM_EPS
  c.attn_length = attn_length
  c.prefix_temporal_length = prefix_temporal_length
  c.num_frames = attn_length * c.num_scenes + prefix_temporal_length
  if mini_batch_size is not None:
    c.mini_batch_size = mini_batch_size
  return c


def init_new_params(config: ml_collections.ConfigDict, seed: int, dtype: Any):
  """Yields (dotted path, array) of the parameters diffusers lacks (TTT + gates), one layer at a time (§9.2).

  Layer i's TTT layer is built with `nnx.Rngs(fold_in(key(seed), i))`: wq/wk/wv/wo with PyTorch's
  default Linear init, lr weight / W1 / W2 ~ N(0, 0.02^2), zeros and ones as listed; gates = 0.1.
  """
  from ttt_dit.model.dit import as_dtype
  from ttt_dit.model.partition import flat_paths
  from ttt_dit.ttt.layer import SSM, Gate
  c = config
  if c.sequence_layer == "none":
    return
  base = jax.random.key(seed)
  np_dtype = common.parse_dtype(dtype)
  for i in range(c.num_layers):
    rngs = nnx.Rngs(params=jax.random.fold_in(base, i))
    ssm = SSM(c.model_dim, c.num_heads, kind=c.sequence_layer, mini_batch_size=c.mini_batch_size,
              ttt_base_lr=c.ttt_base_lr, rope_theta=c.rope_theta, post_norm_eps=c.ttt_post_norm_eps,
              ttt_ln_eps=c.ttt_ln_eps, eta_mode=c.eta_mode, param_dtype=as_dtype(c.param_dtype), rngs=rngs)
    for path, x in flat_paths(nnx.state(ssm, nnx.Param)).items():
      yield f"layers.{i}.seq_modeling_block.ssm.{path}", np.asarray(x).astype(np_dtype)
    for name in ("forward_ssm_gating_text", "forward_ssm_gating_video", "backward_ssm_gating_text",
                 "backward_ssm_gating_video"):
      gate = Gate(c.model_dim, init_value=c.gating_alpha_init)
      yield (f"layers.{i}.seq_modeling_block.{name}.gating_alpha",
             np.asarray(gate.gating_alpha[...]).astype(np_dtype))


def convert_transformer(src_transformer: str, dst_transformer: str, *, sequence_layer: str = "ttt_mlp",
                        seed: int = 0, dtype: str = "bfloat16", attn_length: int = 12,
                        prefix_temporal_length: int = 1, mini_batch_size: int | None = None,
                        spill_to_disk: bool = True) -> ml_collections.ConfigDict:
  """diffusers `transformer/` folder -> orbax checkpoint + ttt_dit_config.json at `dst_transformer`.

  With `spill_to_disk` every converted tensor is kept as a memory map of a scratch file next to the
  output (removed afterwards), so peak anonymous memory stays near one tensor plus orbax's write buffers.
  """
  from ttt_dit.model import loading
  cfg_path = os.path.join(src_transformer, "config.json")
  if not os.path.isfile(cfg_path):
    raise ValueError(f"{src_transformer}: no config.json")
  with open(cfg_path) as f:
    cfg = json.load(f)
  check_diffusers_config(cfg, cfg_path)
  config = model_config(cfg, sequence_layer=sequence_layer, attn_length=attn_length,
                        prefix_temporal_length=prefix_temporal_length, mini_batch_size=mini_batch_size)
  expected = loading.expected_shapes(config)
  new = {p for p in expected if ".ssm." in p or "_ssm_gating_" in p}
  errors = common.ConversionErrors(src_transformer)
  try:
    snapshot = common.SafetensorsSnapshot(src_transformer, errors)
  except ValueError as e:
    errors.add(str(e))
    errors.raise_if_any()
  plan = common.plan_conversion(snapshot, RULES, {p: s for p, s in expected.items() if p not in new},
                                errors=errors)
  errors.raise_if_any()
  with common.staged_tensors(dst_transformer, spill_to_disk) as (flat, keep):
    for path, x in common.iterate_converted(snapshot, plan, dtype, desc="transformer"):
      flat[path] = keep(x)
    for path, x in tqdm(init_new_params(config, seed, dtype), desc="new TTT params", unit="tensor",
                        disable=sequence_layer == "none"):
      if tuple(x.shape) != expected[path]:
        raise ValueError(f"internal: initialised {path} has shape {x.shape}, model expects {expected[path]}")
      flat[path] = keep(x)
    loading.write_dit_checkpoint(dst_transformer, flat, config)
  return config


def convert_snapshot(src: str, dst: str, *, sequence_layer: str = "ttt_mlp", seed: int = 0,
                     dtype: str = "bfloat16", text_encoder_dtype: str | None = None, vae_dtype: str = "float32",
                     overwrite: bool = False, **kwargs: Any) -> None:
  """Converts every part of a CogVideoX snapshot; output renamed into place when complete.

  `dtype` is the stored dtype of the DiT and (unless `text_encoder_dtype`) of T5; the VAE keeps
  `vae_dtype` (float32 by default: it is small and decodes the final pixels).
  """
  from converters.cogvideox_vae import convert_vae  # pylint: disable=import-outside-toplevel
  from converters.t5 import convert_text_encoder  # pylint: disable=import-outside-toplevel
  src_t = os.path.join(src, "transformer")
  if not os.path.isdir(src_t):
    raise ValueError(f"{src}: no transformer/ folder (expected a CogVideoX snapshot)")
  with common.atomic_directory(dst, overwrite=overwrite) as tmp:
    convert_transformer(src_t, os.path.join(tmp, "transformer"), sequence_layer=sequence_layer, seed=seed,
                        dtype=dtype, **kwargs)
    if os.path.isdir(os.path.join(src, "vae")):
      convert_vae(os.path.join(src, "vae"), os.path.join(tmp, "vae"), dtype=vae_dtype)
    if os.path.isdir(os.path.join(src, "text_encoder")):
      convert_text_encoder(os.path.join(src, "text_encoder"), os.path.join(src, "tokenizer"),
                           os.path.join(tmp, "text_encoder"), dtype=text_encoder_dtype or dtype)


FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  convert_snapshot(FLAGS.src, FLAGS.dst, sequence_layer=FLAGS.sequence_layer, seed=FLAGS.seed, dtype=FLAGS.dtype,
                   text_encoder_dtype=FLAGS.text_encoder_dtype, vae_dtype=FLAGS.vae_dtype, overwrite=FLAGS.overwrite, attn_length=FLAGS.attn_length,
                   prefix_temporal_length=FLAGS.prefix_temporal_length, mini_batch_size=FLAGS.mini_batch_size)


def define_flags() -> None:
  """Command-line flags of `python -m converters.cogvideox`."""
  flags.DEFINE_string("src", None, "CogVideoX snapshot folder (with transformer/).", required=True)
  flags.DEFINE_string("dst", None, "Output directory (DIR/transformer, ...).", required=True)
  flags.DEFINE_enum("sequence_layer", "ttt_mlp", ["ttt_mlp", "ttt_linear", "none"], "TTT layer to insert.")
  flags.DEFINE_integer("seed", 0, "Seed of the new TTT parameters.")
  flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16", "float64"], "Stored dtype of the DiT (and T5).")
  flags.DEFINE_enum("text_encoder_dtype", None, ["float32", "bfloat16", "float64"], "Stored T5 dtype (default --dtype).")
  flags.DEFINE_enum("vae_dtype", "float32", ["float32", "bfloat16", "float64"], "Stored VAE dtype.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing --dst.")
  flags.DEFINE_integer("attn_length", 12, "Frames per local-attention window stride.")
  flags.DEFINE_integer("prefix_temporal_length", 1, "Extra leading frames per window.")
  flags.DEFINE_integer("mini_batch_size", None, "TTT mini-batch size (default: 64 TTT-MLP, 16 TTT-Linear).")


if __name__ == "__main__":
  define_flags()
  app.run(main)
