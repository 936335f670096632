"""CogVideoX 3D causal VAE (encoder + decoder), channels-last, over a flat {diffusers key: array} dict.

Follows diffusers.AutoencoderKLCogVideoX (0.42.1) and spec §7: causal convs with first-frame replicate
padding and conv caches carried between frame windows, GroupNorm(groups, 1e-6), SpatialNorm3D
(odd-frame first-frame rule), Down/Upsample3D time rules, logvar clamp. Decode windows: 3 latent frames,
then 2 (official = diffusers); the first window is jitted alone, the rest run in one `lax.scan` carrying
the conv caches. Encode windows: 49 then 48 frames as official (diffusers uses 9 then 8:
`sample_window`), a jitted loop. No spatial tiling.
Conv weights are stored channels-last: conv3d [kt, kh, kw, I, O], conv2d [kh, kw, I, O].
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, jax.Array]


def group_norm(x: jax.Array, w: jax.Array, b: jax.Array, groups: int, eps: float = 1e-6) -> jax.Array:
  """GroupNorm over (T, H, W, C/groups) of x [B, T, H, W, C]."""
  bsz, t, h, wd, c = x.shape
  xg = x.reshape(bsz, t, h, wd, groups, c // groups)
  mean = xg.mean(axis=(1, 2, 3, 5), keepdims=True)
  var = ((xg - mean) ** 2).mean(axis=(1, 2, 3, 5), keepdims=True)
  return ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape) * w + b


def conv3d(x: jax.Array, w: jax.Array, b: jax.Array, pad_hw: int) -> jax.Array:
  """Valid-in-time conv3d, zero padding `pad_hw` in space; x [B, T, H, W, I], w [kt, kh, kw, I, O]."""
  y = jax.lax.conv_general_dilated(x, w.astype(x.dtype), (1, 1, 1), [(0, 0), (pad_hw, pad_hw), (pad_hw, pad_hw)],
                                   dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
  return y + b


def causal_conv(p: Params, name: str, x: jax.Array, cache: dict, key: str) -> jax.Array:
  """CogVideoXCausalConv3d: prepend cached (or first-frame-replicated) kt-1 frames, then conv."""
  w, b = p[name + ".conv.weight"], p[name + ".conv.bias"]
  kt = w.shape[0]
  if kt > 1:
    prev = cache.get(key)
    prev = jnp.repeat(x[:, :1], kt - 1, axis=1) if prev is None else prev
    x = jnp.concatenate([prev, x], axis=1)
    cache[key] = x[:, -(kt - 1):]
  return conv3d(x, w, b, (w.shape[1] - 1) // 2)


def nearest_resize(z: jax.Array, size: tuple[int, int, int]) -> jax.Array:
  """torch F.interpolate(mode='nearest') over (T, H, W) of z [B, T, H, W, C]."""
  for axis, n in zip((1, 2, 3), size):
    m = z.shape[axis]
    idx = np.floor(np.arange(n) * (m / n)).astype(np.int64)
    z = jnp.take(z, jnp.asarray(np.minimum(idx, m - 1)), axis=axis)
  return z


def spatial_norm(p: Params, name: str, f: jax.Array, zq: jax.Array, groups: int, cache: dict) -> jax.Array:
  """SpatialNorm3D: GroupNorm(f) * conv_y(zq) + conv_b(zq), zq resized (first frame apart when T odd)."""
  t = f.shape[1]
  if t > 1 and t % 2 == 1:
    zq = jnp.concatenate([nearest_resize(zq[:, :1], (1,) + f.shape[2:4]),
                          nearest_resize(zq[:, 1:], (t - 1,) + f.shape[2:4])], axis=1)
  else:
    zq = nearest_resize(zq, f.shape[1:4])
  y = causal_conv(p, name + ".conv_y", zq, cache, name + ".conv_y")
  bb = causal_conv(p, name + ".conv_b", zq, cache, name + ".conv_b")
  nf = group_norm(f, p[name + ".norm_layer.weight"], p[name + ".norm_layer.bias"], groups)
  return nf * y + bb


def resnet(p: Params, name: str, x: jax.Array, groups: int, cache: dict, zq: jax.Array | None) -> jax.Array:
  """CogVideoXResnetBlock3D (GroupNorm in the encoder, SpatialNorm3D when zq is given)."""
  def norm(n, h):
    if zq is None:
      return group_norm(h, p[f"{name}.{n}.weight"], p[f"{name}.{n}.bias"], groups)
    return spatial_norm(p, f"{name}.{n}", h, zq, groups, cache)
  h = jax.nn.silu(norm("norm1", x))
  h = causal_conv(p, name + ".conv1", h, cache, name + ".conv1")
  h = jax.nn.silu(norm("norm2", h))
  h = causal_conv(p, name + ".conv2", h, cache, name + ".conv2")
  if name + ".conv_shortcut.weight" in p:
    x = conv3d(x, p[name + ".conv_shortcut.weight"], p[name + ".conv_shortcut.bias"], 0)
  elif name + ".conv_shortcut.conv.weight" in p:
    x = causal_conv(p, name + ".conv_shortcut", x, cache, name + ".conv_shortcut")
  return x + h


def conv2d_frames(x: jax.Array, w: jax.Array, b: jax.Array, stride: int, pad) -> jax.Array:
  """Per-frame conv2d of x [B, T, H, W, I] with w [kh, kw, I, O]."""
  bsz, t = x.shape[:2]
  y = jax.lax.conv_general_dilated(x.reshape((bsz * t,) + x.shape[2:]), w.astype(x.dtype), (stride, stride), pad,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
  return y.reshape((bsz, t) + y.shape[1:])


def downsample(p: Params, name: str, x: jax.Array, compress_time: bool) -> jax.Array:
  """CogVideoXDownsample3D: time avg-pool by 2 (first frame kept when T odd), then stride-2 conv."""
  if compress_time:
    t = x.shape[1]
    if t % 2 == 1:
      rest = x[:, 1:]
      rest = rest.reshape((rest.shape[0], rest.shape[1] // 2, 2) + rest.shape[2:]).mean(2)
      x = jnp.concatenate([x[:, :1], rest], axis=1)
    else:
      x = x.reshape((x.shape[0], t // 2, 2) + x.shape[2:]).mean(2)
  return conv2d_frames(x, p[name + ".conv.weight"], p[name + ".conv.bias"], 2, [(0, 1), (0, 1)])


def upsample(p: Params, name: str, x: jax.Array, compress_time: bool) -> jax.Array:
  """CogVideoXUpsample3D: nearest 2x (time too when compress_time; first frame alone when T odd), conv."""
  t, h, w = x.shape[1:4]
  if compress_time and t > 1 and t % 2 == 1:
    x = jnp.concatenate([nearest_resize(x[:, :1], (1, 2 * h, 2 * w)),
                         nearest_resize(x[:, 1:], (2 * (t - 1), 2 * h, 2 * w))], axis=1)
  elif compress_time and t > 1:
    x = nearest_resize(x, (2 * t, 2 * h, 2 * w))
  else:
    x = nearest_resize(x, (t, 2 * h, 2 * w))
  return conv2d_frames(x, p[name + ".conv.weight"], p[name + ".conv.bias"], 1, [(1, 1), (1, 1)])


def _count(p: Params, prefix: str) -> int:
  """Number of indexed children `prefix.{i}.` present in p."""
  n = 0
  while any(k.startswith(f"{prefix}.{n}.") for k in p):
    n += 1
  return n


def encoder_window(p: Params, cfg: dict, x: jax.Array, cache: dict) -> jax.Array:
  """One frame window of CogVideoXEncoder3D: x [B, T, H, W, 3] -> [B, T', h, w, 2*C_lat]."""
  g = cfg["norm_num_groups"]
  tcl = int(np.log2(cfg.get("temporal_compression_ratio", 4)))
  h = causal_conv(p, "encoder.conv_in", x, cache, "encoder.conv_in")
  nb = _count(p, "encoder.down_blocks")
  for i in range(nb):
    for j in range(_count(p, f"encoder.down_blocks.{i}.resnets")):
      h = resnet(p, f"encoder.down_blocks.{i}.resnets.{j}", h, g, cache, None)
    if f"encoder.down_blocks.{i}.downsamplers.0.conv.weight" in p:
      h = downsample(p, f"encoder.down_blocks.{i}.downsamplers.0", h, i < tcl)
  for j in range(_count(p, "encoder.mid_block.resnets")):
    h = resnet(p, f"encoder.mid_block.resnets.{j}", h, g, cache, None)
  h = jax.nn.silu(group_norm(h, p["encoder.norm_out.weight"], p["encoder.norm_out.bias"], g))
  return causal_conv(p, "encoder.conv_out", h, cache, "encoder.conv_out")


def decoder_window(p: Params, cfg: dict, z: jax.Array, cache: dict) -> jax.Array:
  """One latent window of CogVideoXDecoder3D: z [B, t, h, w, C_lat] -> [B, T, H, W, 3]."""
  g = cfg["norm_num_groups"]
  tcl = int(np.log2(cfg.get("temporal_compression_ratio", 4)))
  h = causal_conv(p, "decoder.conv_in", z, cache, "decoder.conv_in")
  for j in range(_count(p, "decoder.mid_block.resnets")):
    h = resnet(p, f"decoder.mid_block.resnets.{j}", h, g, cache, z)
  for i in range(_count(p, "decoder.up_blocks")):
    for j in range(_count(p, f"decoder.up_blocks.{i}.resnets")):
      h = resnet(p, f"decoder.up_blocks.{i}.resnets.{j}", h, g, cache, z)
    if f"decoder.up_blocks.{i}.upsamplers.0.conv.weight" in p:
      h = upsample(p, f"decoder.up_blocks.{i}.upsamplers.0", h, i < tcl)
  h = jax.nn.silu(spatial_norm(p, "decoder.norm_out", h, z, g, cache))
  return causal_conv(p, "decoder.conv_out", h, cache, "decoder.conv_out")


def windows(n: int, size: int) -> list[tuple[int, int]]:
  """Official/diffusers frame windows: the first takes the remainder extra (3 then 2 for size 2)."""
  rem = n % size
  return [(size * i + (0 if i == 0 else rem), min(n, size * (i + 1) + rem)) for i in range(max(n // size, 1))]


def _with_cache(fn, p: Params, cfg: dict, x: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
  """Runs one window functionally: returns (output, the updated conv cache)."""
  cache = dict(cache)
  return fn(p, cfg, x, cache), cache


def _scan_windows(fn, p: Params, cfg: dict, zs: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
  """`lax.scan` of `fn` over equal windows zs [N, B, w, ...], carrying the conv caches."""
  def body(c, z):
    y, c = _with_cache(fn, p, cfg, z, c)
    return c, y
  cache, ys = jax.lax.scan(body, cache, zs)  # ys [N, B, W, H, W, 3]
  return ys, cache


class CogVideoXVAE:
  """Windowed encode/decode with conv caches carried between windows."""

  def __init__(self, params: Params, config: dict, latent_window: int = 2, sample_window: int = 48):
    self.p, self.cfg = params, config
    self.latent_window, self.sample_window = latent_window, sample_window
    self._dec = jax.jit(lambda p, z, cache: _with_cache(decoder_window, p, config, z, cache))
    self._dec_scan = jax.jit(lambda p, zs, cache: _scan_windows(decoder_window, p, config, zs, cache))
    self._enc = jax.jit(lambda p, x, cache: _with_cache(encoder_window, p, config, x, cache))

  def decode(self, latents: jax.Array) -> jax.Array:
    """latents [B, t, h, w, C_lat] -> video [B, T, H, W, 3]."""
    latents = jnp.asarray(latents)
    wins = windows(latents.shape[1], self.latent_window)
    a, b = wins[0]
    y, cache = self._dec(self.p, latents[:, a:b], {})  # first window (3 latents for odd T)
    if len(wins) == 1:
      return y
    rest = latents[:, b:]  # [B, N*w, h, w_, C], later windows all `latent_window` long
    n = len(wins) - 1
    zs = jnp.moveaxis(rest.reshape((rest.shape[0], n, self.latent_window) + rest.shape[2:]), 1, 0)
    ys, _ = self._dec_scan(self.p, zs, cache)  # [N, B, F, H, W, 3]
    ys = jnp.moveaxis(ys, 0, 1)
    ys = ys.reshape((ys.shape[0], -1) + ys.shape[3:])
    return jnp.concatenate([y, ys], axis=1)

  def encode(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
    """video [B, T, H, W, 3] in [-1, 1] -> (mean, logvar) each [B, t, h, w, C_lat], logvar clamped."""
    cache: dict = {}
    outs = []
    for a, b in windows(video.shape[1], self.sample_window):
      y, cache = self._enc(self.p, jnp.asarray(video[:, a:b]), cache)
      outs.append(y)
    m = jnp.concatenate(outs, axis=1)
    mean, logvar = jnp.split(m, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)


def load_vae(path: str, dtype: Any = jnp.bfloat16, sample_window: int = 48) -> CogVideoXVAE:
  """Loads a converted VAE directory; encode windows are 49 then 48 frames as official (diffusers: 9/8)."""
  from converters.common import flatten, load_orbax  # pylint: disable=import-outside-toplevel
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise ValueError(f"{path}: no config.json (not a converted CogVideoX VAE)")
  with open(cfg_path) as f:
    config = json.load(f)
  flat = flatten(load_orbax(os.path.join(path, "params")))
  return CogVideoXVAE({k: jnp.asarray(v, dtype) for k, v in flat.items()}, config, sample_window=sample_window)
