"""T5 v1.1 encoder (the CogVideoX text encoder) in Flax NNX.

Official behaviour (spec §6): relative position buckets whose table lives in layer 0 and is shared by
all layers, no 1/sqrt(d) attention scaling, RMSNorm computed in float32, gated tanh-GELU FFN, no
attention mask (padding tokens are attended, as the official pipeline does).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

CONFIG_NAME = "config.json"
PARAMS_DIR = "params"


def relative_position_bucket(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """Bidirectional T5 bucket ids [L, L] (memory - query), computed in float32 like the official code."""
  ctx = np.arange(length)[:, None]
  mem = np.arange(length)[None, :]
  rel = mem - ctx  # [L, L]
  nb = num_buckets // 2
  bucket = (rel > 0).astype(np.int64) * nb
  rel = np.abs(rel)
  max_exact = nb // 2
  is_small = rel < max_exact
  with np.errstate(divide="ignore"):
    large = max_exact + (np.log(rel.astype(np.float32) / np.float32(max_exact))
                         / np.float32(math.log(max_distance / max_exact)) * np.float32(nb - max_exact))
  large = np.where(is_small, 0, large).astype(np.int64)
  large = np.minimum(large, nb - 1)
  return bucket + np.where(is_small, rel, large)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """T5 LayerNorm: no mean subtraction, no bias; statistics in float32, result in the weight's dtype."""
  xf = x.astype(jnp.float32) if x.dtype != jnp.float64 else x
  var = jnp.mean(xf * xf, axis=-1, keepdims=True)
  y = xf * jax.lax.rsqrt(var + eps)
  if weight.dtype in (jnp.bfloat16, jnp.float16):
    y = y.astype(weight.dtype)
  return weight * y


def gelu_tanh(x: jax.Array) -> jax.Array:
  """HF `gelu_new` (tanh approximation)."""
  return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


class T5Block(nnx.Module):
  """One encoder block: pre-norm self-attention + pre-norm gated-GELU FFN, both residual."""

  def __init__(self, d_model: int, num_heads: int, d_kv: int, d_ff: int, dtype: Any, *, rngs: nnx.Rngs):
    inner = num_heads * d_kv
    init = nnx.initializers.normal(0.02)
    self.num_heads, self.d_kv = num_heads, d_kv
    self.q = nnx.Param(init(rngs.params(), (d_model, inner), dtype))  # [D, H*K] (x @ W)
    self.k = nnx.Param(init(rngs.params(), (d_model, inner), dtype))
    self.v = nnx.Param(init(rngs.params(), (d_model, inner), dtype))
    self.o = nnx.Param(init(rngs.params(), (inner, d_model), dtype))
    self.attn_norm = nnx.Param(jnp.ones((d_model,), dtype))
    self.wi_0 = nnx.Param(init(rngs.params(), (d_model, d_ff), dtype))
    self.wi_1 = nnx.Param(init(rngs.params(), (d_model, d_ff), dtype))
    self.wo = nnx.Param(init(rngs.params(), (d_ff, d_model), dtype))
    self.ffn_norm = nnx.Param(jnp.ones((d_model,), dtype))

  def __call__(self, x: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """x [B, L, D], bias [1, H, L, L] -> [B, L, D]."""
    b, l, _ = x.shape
    h = rms_norm(x, self.attn_norm[...], eps)
    split = lambda t: t.reshape(b, l, self.num_heads, self.d_kv)  # [B, L, H, K]
    q, k, v = split(h @ self.q[...]), split(h @ self.k[...]), split(h @ self.v[...])
    scores = jnp.einsum("blhk,bmhk->bhlm", q, k) + bias.astype(q.dtype)  # [B, H, L, L], no scaling
    probs = jax.nn.softmax(scores.astype(jnp.promote_types(scores.dtype, jnp.float32)), axis=-1)
    probs = probs.astype(q.dtype)
    attn = jnp.einsum("bhlm,bmhk->blhk", probs, v).reshape(b, l, -1)
    x = x + attn @ self.o[...]
    h = rms_norm(x, self.ffn_norm[...], eps)
    h = gelu_tanh(h @ self.wi_0[...]) * (h @ self.wi_1[...])
    return x + h @ self.wo[...]


class T5Encoder(nnx.Module):
  """T5 v1.1 encoder stack; `config` holds the HF T5Config fields."""

  def __init__(self, config: dict[str, Any], dtype: Any = jnp.float32, *, rngs: nnx.Rngs):
    self.cfg = dict(config)
    d, h = config["d_model"], config["num_heads"]
    self.embed = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (config["vocab_size"], d), dtype))
    self.rel_bias = nnx.Param(jnp.zeros((config["relative_attention_num_buckets"], h), dtype))  # layer 0's
    self.blocks = nnx.List([T5Block(d, h, config["d_kv"], config["d_ff"], dtype, rngs=rngs)
                            for _ in range(config["num_layers"])])
    self.final_norm = nnx.Param(jnp.ones((d,), dtype))

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    """input_ids int [B, L] -> hidden states [B, L, D] (no mask)."""
    eps = self.cfg.get("layer_norm_epsilon", 1e-6)
    length = input_ids.shape[1]
    buckets = relative_position_bucket(length, self.cfg["relative_attention_num_buckets"],
                                       self.cfg.get("relative_attention_max_distance", 128))
    bias = jnp.transpose(self.rel_bias[...][jnp.asarray(buckets)], (2, 0, 1))[None]  # [1, H, L, L]
    x = self.embed[...][input_ids]  # [B, L, D]
    for block in self.blocks:
      x = block(x, bias, eps)
    return rms_norm(x, self.final_norm[...], eps)


def param_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
  """Flat target path -> shape of every parameter of `T5Encoder(config)`."""
  model = nnx.eval_shape(lambda: T5Encoder(config, rngs=nnx.Rngs(0)))
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {".".join(str(p) for p in path): tuple(v.get_value().shape) for path, v in flat}


def assign_params(model: nnx.Module, flat: dict[str, Any]) -> None:
  """Sets every parameter from a flat {dotted path: array} dict (paths as in `param_shapes`)."""
  state = nnx.state(model, nnx.Param)
  for path, var in nnx.to_flat_state(state):
    key = ".".join(str(p) for p in path)
    if key not in flat:
      raise ValueError(f"checkpoint lacks parameter {key}")
    value = jnp.asarray(flat[key], dtype=var.get_value().dtype)
    if value.shape != var.get_value().shape:
      raise ValueError(f"parameter {key}: expected shape {var.get_value().shape}, got {value.shape}")
    var.set_value(value)  # also fills a shape-only (nnx.eval_shape) model
  nnx.update(model, state)


def load_text_encoder(path: str, dtype: Any = jnp.bfloat16) -> Callable[[jax.Array], jax.Array]:
  """Loads a converted T5 directory (`config.json` + orbax `params/`); returns jitted `enc(ids [B, L])`.

  When the directory holds the tokenizer (`tokenizer/`, as `converters.t5` writes it), the callable also
  has `enc.tokenize(texts, max_length) -> int32 ids [N, max_length]` (EOS, padded, truncated as official).
  """
  from converters.common import flatten, load_orbax  # pylint: disable=import-outside-toplevel
  cfg_path = os.path.join(path, CONFIG_NAME)
  if not os.path.exists(cfg_path):
    raise ValueError(f"{path}: no {CONFIG_NAME} (not a converted T5 text encoder)")
  with open(cfg_path) as f:
    config = json.load(f)
  model = nnx.eval_shape(lambda: T5Encoder(config, dtype, rngs=nnx.Rngs(0)))  # no random init of 4.7B params
  assign_params(model, flatten(load_orbax(os.path.join(path, PARAMS_DIR))))
  graph, state = nnx.split(model)

  @jax.jit
  def _apply(state, input_ids: jax.Array) -> jax.Array:
    return nnx.merge(graph, state)(input_ids)

  def enc(input_ids: jax.Array) -> jax.Array:
    """int ids [B, L] -> hidden states [B, L, D]."""
    return _apply(state, jnp.asarray(input_ids, jnp.int32))

  def tokenize_texts(texts: list[str], max_length: int) -> np.ndarray:
    """Strings -> int32 ids [N, max_length] with this encoder's tokenizer (scene tokens added)."""
    from ttt_dit.text.tokenizer import tokenize  # pylint: disable=import-outside-toplevel
    return tokenize(list(texts), os.path.join(path, "tokenizer"), max_length)

  enc.tokenize = tokenize_texts  # type: ignore[attr-defined]
  enc.config = config  # type: ignore[attr-defined]
  return enc
