"""Saving and loading converted DiT checkpoints.

Layout: `DIR/transformer/` is an orbax checkpoint of the float parameter state (a nested dict keyed by
the NNX attribute names, list indices as strings) plus `DIR/transformer/ttt_dit_config.json` (the
ml-collections model config as JSON).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from converters import common
from ttt_dit.model.configs import get_config
from ttt_dit.model.dit import DiT, as_dtype
from ttt_dit.model.partition import flat_paths, path_str

CONFIG_FILE = "ttt_dit_config.json"
TRANSFORMER = "transformer"


def transformer_dir(path: str) -> str:
  """Accepts either DIR or DIR/transformer; returns the directory holding the orbax checkpoint."""
  if os.path.isfile(os.path.join(path, CONFIG_FILE)):
    return path
  sub = os.path.join(path, TRANSFORMER)
  if os.path.isfile(os.path.join(sub, CONFIG_FILE)):
    return sub
  raise ValueError(f"{path}: not a converted DiT checkpoint (no {TRANSFORMER}/{CONFIG_FILE})")


def random_state(abstract: nnx.Module, key: jax.Array, std: float = 0.02) -> tuple[Any, Any]:
  """(graphdef, state) of a shape-only module (`nnx.eval_shape`) with N(0, std^2) floats, made leaf by leaf.

  For benchmarks with random weights at full size: one small program per distinct leaf shape instead of
  one initialiser program for the whole model (minutes to compile at 5B). Integer leaves are zeros.
  """
  graphdef, state = nnx.split(abstract)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(key, len(leaves))
  made = [jax.random.normal(k, l.shape, l.dtype) * jnp.asarray(std, l.dtype)
          if jnp.issubdtype(l.dtype, jnp.floating) else jnp.zeros(l.shape, l.dtype)
          for k, l in zip(keys, leaves)]
  return graphdef, jax.tree.unflatten(treedef, made)


def config_from_dict(d: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Rebuilds a model config from JSON, refusing keys unknown to the current presets."""
  c = get_config("tiny", "none")
  unknown = sorted(set(d) - set(c.keys()))
  if unknown:
    raise ValueError(f"{CONFIG_FILE}: unknown config keys {unknown}")
  c.update(dict(d))
  return c


def abstract_model(config: ml_collections.ConfigDict) -> DiT:
  """Shape-only DiT (no memory allocated for weights)."""
  return nnx.eval_shape(lambda: DiT(config, rngs=nnx.Rngs(0)))


def expected_shapes(config: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
  """{dotted NNX path: shape} of every parameter of the model a config describes."""
  state = nnx.state(abstract_model(config), nnx.Param)
  return {p: tuple(x.shape) for p, x in flat_paths(state).items()}


def write_dit_checkpoint(dst_transformer: str, flat_params: Mapping[str, np.ndarray],
                         config: ml_collections.ConfigDict) -> None:
  """Writes {dotted path: array} + config as DIR/transformer (caller handles atomic renames)."""
  missing = sorted(set(expected_shapes(config)) - set(flat_params))
  if missing:
    raise ValueError(f"write_dit_checkpoint: parameters missing: {missing}")
  common.save_orbax(dst_transformer, common.unflatten(dict(flat_params)))
  common.write_json(os.path.join(dst_transformer, CONFIG_FILE), config.to_dict())


def save_dit(path: str, model: DiT, config: ml_collections.ConfigDict, *, overwrite: bool = True) -> None:
  """Saves a model's parameters (as stored, e.g. float32) and config to `path/transformer`, atomically."""
  flat = {p: np.asarray(x) for p, x in flat_paths(nnx.state(model, nnx.Param)).items()}
  dst = os.path.join(path, TRANSFORMER)
  with common.atomic_directory(dst, overwrite=overwrite) as tmp:
    write_dit_checkpoint(os.path.join(tmp, "ckpt"), flat, config)
    for name in os.listdir(os.path.join(tmp, "ckpt")):
      os.rename(os.path.join(tmp, "ckpt", name), os.path.join(tmp, name))
    os.rmdir(os.path.join(tmp, "ckpt"))


def load_orbax_flat(path: str) -> dict[str, np.ndarray]:
  """{dotted path: stored array} of a checkpoint directory (DIR or DIR/transformer), as stored."""
  return common.flatten(common.load_orbax(transformer_dir(path)))


def load_config(path: str) -> ml_collections.ConfigDict:
  """Reads the model config stored next to a checkpoint."""
  with open(os.path.join(transformer_dir(path), CONFIG_FILE)) as f:
    return config_from_dict(json.load(f))


def load_dit_model(path: str, *, dtype: Any = None, param_dtype: Any = None,
                   **config_overrides: Any) -> tuple[DiT, ml_collections.ConfigDict]:
  """Loads (model, config); `dtype` overrides the compute dtype, `param_dtype` the parameter dtype.

  Every stored tensor must match the model: unknown, missing or mis-shaped ones raise one ValueError
  naming all of them.
  """
  tdir = transformer_dir(path)
  config = load_config(tdir)
  if dtype is not None:
    config.dtype = jnp.dtype(dtype).name
  if param_dtype is not None:
    config.param_dtype = jnp.dtype(param_dtype).name
  for k, v in config_overrides.items():
    if k not in config:
      raise ValueError(f"load_dit_model: unknown config override {k!r}")
    config[k] = v
  model = abstract_model(config)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  stored = load_orbax_flat(tdir)
  expected = flat_paths(params)
  common.check_stored(tdir, {p: x.shape for p, x in stored.items()},
                      {p: x.shape for p, x in expected.items()})
  pdt = as_dtype(config.param_dtype)
  # Pop each stored array as it is converted: at most one extra tensor is alive at a time.
  params = jax.tree_util.tree_map_with_path(lambda kp, _: jnp.asarray(stored.pop(path_str(kp)), pdt), params)
  rest = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x, rest)
  return nnx.merge(graphdef, params, rest), config


def load_dit(path: str, dtype: Any = jnp.bfloat16) -> Callable[..., jax.Array]:
  """Loads a converted checkpoint; returns jitted `dit(latents [B,T,H,W,C], text [B,S,L_t,Dt] or [B,L_t,Dt], t [B])`.

  Parameters are cast to `dtype` too (inference: one copy of the weights at compute precision).
  """
  model, _ = load_dit_model(path, dtype=dtype, param_dtype=dtype)
  graphdef, state = nnx.split(model)

  @jax.jit
  def _apply(state, latents, text, timesteps):
    return nnx.merge(graphdef, state)(latents, text, timesteps)

  def dit(latents: jax.Array, text: jax.Array, timesteps: jax.Array) -> jax.Array:
    """[B, T, H, W, C] latents, text embeddings, integer timesteps [B] -> v-prediction [B, T, H, W, C]."""
    return _apply(state, latents, text, jnp.asarray(timesteps))

  dit.model = model  # type: ignore[attr-defined]
  return dit
