"""CogVideoX 3D causal VAE (encoder + decoder), channels-last, over a flat {diffusers key: array} dict.

Follows diffusers.AutoencoderKLCogVideoX (0.42.1) and spec §7: causal convs with first-frame replicate
padding and conv caches carried between frame windows, GroupNorm(groups, 1e-6), SpatialNorm3D
(odd-frame first-frame rule), Down/Upsample3D time rules, logvar clamp. Decode windows: 3 latent frames,
then 2 (official = diffusers); the first window is jitted alone, the rest run in one `lax.scan` carrying
the conv caches. Encode windows: 49 then 48 frames as official (diffusers uses 9 then 8:
`sample_window`), a jitted loop. Optional spatial tiling of decode (`Tiling`), as diffusers' `tiled_decode`.
Conv weights are stored channels-last: conv3d [kt, kh, kw, I, O], conv2d [kh, kw, I, O].

The math is pure functions of the flat dict (the conv caches are a pytree carried by the scan);
`CogVideoXVAE` is the NNX module that owns the parameters (`nnx.Param`s nested as the diffusers names)
and hands them to the jitted window functions as arguments.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

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


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Spatial tiling of `decode`, exactly diffusers' `AutoencoderKLCogVideoX.tiled_decode`.

  Latent tiles of `tile_height / s x tile_width / s` (s = 8, the spatial compression) start every
  int(latent tile * (1 - overlap)) latents; each tile is decoded alone (windowed in time as usual),
  blended linearly into its already blended upper and left neighbours over int(tile * overlap) pixels,
  then cropped to tile - int(tile * overlap) pixels. Used only when the latents are larger than one
  tile. Defaults are diffusers' for CogVideoX (half of 480x720; overlaps 1/6 and 1/5). GroupNorm
  statistics are per tile, so the result differs slightly from the untiled decode.
  """
  tile_height: int = 240           # pixels
  tile_width: int = 360
  overlap_height: float = 1 / 6
  overlap_width: float = 1 / 5


@dataclasses.dataclass(frozen=True)
class _Axis:
  """One spatial axis of a tiling plan (latent tile size, tile starts, blend extent and crop in pixels)."""
  tile: int
  starts: tuple[int, ...]
  blend: int
  limit: int


def _plan_axis(n: int, tile_px: int, overlap: float, scale: int, name: str) -> _Axis:
  """diffusers' integer arithmetic for one axis; refuses settings whose crops do not cover n * scale pixels."""
  tile = int(tile_px / scale)
  step = int(tile * (1 - overlap))
  blend = int(tile_px * overlap)
  limit = tile_px - blend
  if tile < 1 or step < 1:
    raise ValueError(f"VAE tiling: tile_{name} {tile_px} with overlap {overlap} gives a latent tile of {tile} and a "
                     f"step of {step}; both must be >= 1")
  starts = tuple(range(0, n, step))
  covered = sum(min(limit, scale * min(tile, n - a)) for a in starts)
  if covered != n * scale:
    raise ValueError(f"VAE tiling: tile_{name} {tile_px} with overlap {overlap} covers {covered} of {n * scale} "
                     f"pixels (tile - int(tile * overlap) must equal {scale} * int(tile / {scale} * (1 - overlap)))")
  return _Axis(tile, starts, blend, limit)


def blend_rows(a: jax.Array, b: jax.Array, extent: int, axis: int) -> jax.Array:
  """diffusers blend_v (axis 2) / blend_h (axis 3): b's first `extent` lines fade in from a's last ones."""
  extent = min(a.shape[axis], b.shape[axis], extent)
  if extent <= 0:
    return b
  w = (jnp.arange(extent, dtype=jnp.float64 if b.dtype == jnp.float64 else jnp.float32) / extent).astype(b.dtype)
  w = w.reshape((extent,) + (1,) * (b.ndim - axis - 1))                 # broadcast along `axis`
  head = jax.lax.slice_in_dim(b, 0, extent, axis=axis)
  tail = jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis)
  return jax.lax.dynamic_update_slice_in_dim(b, tail * (1 - w) + head * w, 0, axis=axis)


def nnx_params(flat: Params) -> nnx.Dict:
  """{diffusers key: array} -> nested `nnx.Dict` / `nnx.List` of `nnx.Param`, one level per key segment.

  Indexed segments ("down_blocks.0") become `nnx.List`s, so an nnx path joined with "." is the diffusers
  key again (`flat_params` is the inverse).
  """
  def nest(items: dict[tuple[str, ...], Any], where: str) -> nnx.Dict | nnx.List:
    groups: dict[str, dict[tuple[str, ...], Any]] = {}
    for parts, v in items.items():
      groups.setdefault(parts[0], {})[parts[1:]] = v
    children = {}
    for name, sub in groups.items():
      key = f"{where}.{name}" if where else name
      if () in sub:
        if len(sub) > 1:
          raise ValueError(f"VAE parameter {key} is both a tensor and a prefix of others")
        children[name] = nnx.Param(jnp.asarray(sub[()]))
      else:
        children[name] = nest(sub, key)
    if all(n.isdigit() for n in children) and sorted(int(n) for n in children) == list(range(len(children))):
      return nnx.List([children[str(i)] for i in range(len(children))])
    return nnx.Dict(children)
  return nest({tuple(k.split(".")): v for k, v in flat.items()}, "")


def flat_params(module: nnx.Module) -> Params:
  """Inverse of `nnx_params`: every `nnx.Param` under `module` keyed by its path joined with "."."""
  return {".".join(str(p) for p in path): var[...]
          for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def _freeze(x: Any) -> Any:
  """Hashable copy of a JSON config (lists -> tuples, dicts -> sorted item tuples): a static jit argument."""
  if isinstance(x, dict):
    return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
  if isinstance(x, (list, tuple)):
    return tuple(_freeze(v) for v in x)
  return x


class _Progress:
  """Host-side sink of the decode scan's per-window callback (set for the duration of one `decode`)."""
  fn: Callable[[int], None] | None = None


def _tick() -> None:
  if _Progress.fn is not None:
    _Progress.fn(1)


@functools.partial(jax.jit, static_argnames="cfg")
def _decode_first(p: Params, z: jax.Array, cache: dict, cfg: tuple) -> tuple[jax.Array, dict]:
  """First decode window (3 latents for odd T): (video frames, conv caches)."""
  return _with_cache(decoder_window, p, dict(cfg), z, cache)


@functools.partial(jax.jit, static_argnames="cfg")
def _decode_scan(p: Params, zs: jax.Array, cache: dict, cfg: tuple) -> tuple[jax.Array, dict]:
  """Later decode windows zs [N, B, w, h, w_, C] in one scan; `_tick` after each window."""
  def window_tick(p, cfg, z, c):
    y = decoder_window(p, cfg, z, c)
    jax.debug.callback(_tick)
    return y
  return _scan_windows(window_tick, p, dict(cfg), zs, cache)


@functools.partial(jax.jit, static_argnames="cfg")
def _encode_window(p: Params, x: jax.Array, cache: dict, cfg: tuple) -> tuple[jax.Array, dict]:
  """One encode window: (moments, conv caches)."""
  return _with_cache(encoder_window, p, dict(cfg), x, cache)


class CogVideoXVAE(nnx.Module):
  """CogVideoX 3D causal VAE as an NNX module: windowed encode/decode, optional spatial tiling of decode.

  Parameters are `nnx.Param`s under `self.encoder` / `self.decoder`, nested as the diffusers names
  (`vae.decoder["conv_in"]["conv"]["weight"]` is "decoder.conv_in.conv.weight"), so `nnx.state`,
  `nnx.split` / `nnx.merge` and `nnx.grad` see them. `encode` / `decode` read them back as the flat
  {diffusers key: array} dict (`flat_params`) and pass it as an argument to the jitted window functions.
  """

  def __init__(self, params: Params, config: dict, latent_window: int = 2, sample_window: int = 48,
               tiling: Tiling | None = None):
    tree = nnx_params(params)
    if not isinstance(tree, nnx.Dict) or sorted(tree) != ["decoder", "encoder"]:
      names = sorted(tree) if isinstance(tree, nnx.Dict) else []
      raise ValueError(f"VAE parameters must sit under exactly 'encoder' and 'decoder', got top-level {names}")
    self.encoder, self.decoder = tree["encoder"], tree["decoder"]
    self.cfg = dict(config)
    self.latent_window, self.sample_window = latent_window, sample_window
    self.tiling = tiling
    self.spatial_scale = 2 ** (len(config.get("block_out_channels", (0,) * 4)) - 1)
    self.progress: Callable[[int], None] | None = None  # default of decode's `progress`

  @property
  def p(self) -> Params:
    """The parameters as the flat {diffusers key: array} dict the window functions take."""
    return flat_params(self)

  def num_decode_steps(self, latent_shape: tuple[int, ...]) -> int:
    """How many windows (x tiles) `decode` runs for latents of this shape: the `progress` total."""
    n_win = len(windows(latent_shape[1], self.latent_window))
    if not self._tiled(latent_shape):
      return n_win
    ah, aw = self._plan(latent_shape)
    return n_win * len(ah.starts) * len(aw.starts)

  def _tiled(self, latent_shape: tuple[int, ...]) -> bool:
    if self.tiling is None:
      return False
    h, w = latent_shape[2:4]
    return w > int(self.tiling.tile_width / self.spatial_scale) or h > int(self.tiling.tile_height / self.spatial_scale)

  def _plan(self, latent_shape: tuple[int, ...]) -> tuple[_Axis, _Axis]:
    t, s = self.tiling, self.spatial_scale
    return (_plan_axis(latent_shape[2], t.tile_height, t.overlap_height, s, "height"),
            _plan_axis(latent_shape[3], t.tile_width, t.overlap_width, s, "width"))

  def decode(self, latents: jax.Array, progress: Callable[[int], None] | None = None) -> jax.Array:
    """latents [B, t, h, w, C_lat] -> video [B, 4(t-1)+1, 8h, 8w, 3] (spatially tiled when `tiling` is set).

    `progress(1)` is called after each decoded window (`num_decode_steps` calls in all), e.g. tqdm.update.
    """
    latents = jnp.asarray(latents)
    progress = progress if progress is not None else self.progress
    p, cfg = self.p, _freeze(self.cfg)
    old, _Progress.fn = _Progress.fn, progress
    try:
      if self._tiled(latents.shape):
        out = self._decode_tiled(p, cfg, latents, progress)
      else:
        out = self._decode_windows(p, cfg, latents, progress)
      if progress is not None:
        out = jax.block_until_ready(out)
        jax.effects_barrier()  # every window's host callback has run
      return out
    finally:
      _Progress.fn = old

  def _decode_windows(self, p: Params, cfg: tuple, latents: jax.Array, progress) -> jax.Array:
    """Temporal windows of the official rule over the whole spatial extent."""
    wins = windows(latents.shape[1], self.latent_window)
    a, b = wins[0]
    y, cache = _decode_first(p, latents[:, a:b], {}, cfg)  # first window (3 latents for odd T)
    if progress is not None:
      progress(1)
    if len(wins) == 1:
      return y
    rest = latents[:, b:]  # [B, N*w, h, w_, C], later windows all `latent_window` long
    n = len(wins) - 1
    zs = jnp.moveaxis(rest.reshape((rest.shape[0], n, self.latent_window) + rest.shape[2:]), 1, 0)
    ys, _ = _decode_scan(p, zs, cache, cfg)  # [N, B, F, H, W, 3]
    ys = jnp.moveaxis(ys, 0, 1)
    ys = ys.reshape((ys.shape[0], -1) + ys.shape[3:])
    return jnp.concatenate([y, ys], axis=1)

  def _decode_tiled(self, p: Params, cfg: tuple, latents: jax.Array, progress) -> jax.Array:
    """diffusers `tiled_decode`: overlapping latent tiles, each blended with its (blended) upper/left tiles."""
    ah, aw = self._plan(latents.shape)
    rows = [[self._decode_windows(p, cfg, latents[:, :, i:i + ah.tile, j:j + aw.tile], progress)
             for j in aw.starts] for i in ah.starts]                     # tiles [B, F, <=th*s, <=tw*s, 3]
    out_rows = []
    for r, row in enumerate(rows):
      out = []
      for c in range(len(row)):
        tile = row[c]
        if r > 0:
          tile = blend_rows(rows[r - 1][c], tile, ah.blend, axis=2)
        if c > 0:
          tile = blend_rows(row[c - 1], tile, aw.blend, axis=3)
        row[c] = tile                                                    # later tiles blend with this one
        out.append(tile[:, :, :ah.limit, :aw.limit])
      out_rows.append(jnp.concatenate(out, axis=3))
    return jnp.concatenate(out_rows, axis=2)

  def encode(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
    """video [B, T, H, W, 3] in [-1, 1] -> (mean, logvar) each [B, t, h, w, C_lat], logvar clamped."""
    p, cfg = self.p, _freeze(self.cfg)
    cache: dict = {}
    outs = []
    for a, b in windows(video.shape[1], self.sample_window):
      y, cache = _encode_window(p, jnp.asarray(video[:, a:b]), cache, cfg)
      outs.append(y)
    m = jnp.concatenate(outs, axis=1)
    mean, logvar = jnp.split(m, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)


def load_vae(path: str, dtype: Any = jnp.bfloat16, sample_window: int = 48, tiling: Tiling | None = None
             ) -> CogVideoXVAE:
  """Loads a converted VAE directory; encode windows are 49 then 48 frames as official (diffusers: 9/8).

  `tiling`: optional spatial tiling of decode (`Tiling()` = diffusers' CogVideoX defaults).
  """
  from converters.common import flatten, load_orbax  # pylint: disable=import-outside-toplevel
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise ValueError(f"{path}: no config.json (not a converted CogVideoX VAE)")
  with open(cfg_path) as f:
    config = json.load(f)
  flat = flatten(load_orbax(os.path.join(path, "params")))
  return CogVideoXVAE({k: jnp.asarray(v, dtype) for k, v in flat.items()}, config, sample_window=sample_window,
                      tiling=tiling)
