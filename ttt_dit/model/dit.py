"""The CogVideoX-5B diffusion transformer with TTT-Video's local attention and bidirectional TTT (spec §2, §4).

Channels-last: latents [B, T, H, W, C]; text [B, S, L_t, D_text] (S scenes); timesteps int [B].
Module attribute names mirror the official PyTorch names (spec §2.8) so that converters are tables:
`time_embed.linear_1` is official `time_embed.0`, `*_adaLN_modulation` is the Linear of official
`*_adaLN_modulation.1`, everything else has the official name.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from ttt_dit.model.configs import validate_config
from ttt_dit.model.rope import apply_rope_interleaved, attention_rope_tables
from ttt_dit.ttt.multiscene import SequenceMetadata

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float64": jnp.float64}


def as_dtype(name) -> jnp.dtype:
  """Config dtype string (or dtype) -> jnp dtype."""
  if isinstance(name, str):
    if name not in DTYPES:
      raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return jnp.dtype(DTYPES[name])
  return jnp.dtype(name)


# ----------------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------------


def timestep_embedding(t: Array, dim: int, max_period: float = 10000.0) -> Float[Array, "B dim"]:
  """[cos(t f) | sin(t f)], f_i = exp(-ln(max_period) i / (dim/2)); float32 as in the official code (§2.2)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)  # [half]
  args = t.astype(jnp.float32)[:, None] * freqs[None]  # [B, half]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)  # [B, 2*half]
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def patchify(x: Float[Array, "B T Hl Wl C"], p: int) -> Float[Array, "B L Cpp"]:
  """[B, T, p*h, p*w, C] -> [B, T*h*w, C*p*p] with each patch flattened in (c, dy, dx) order (§2.3)."""
  B, T, Hl, Wl, C = x.shape
  if Hl % p or Wl % p:
    raise ValueError(f"latent size {Hl}x{Wl} is not divisible by the patch size {p} (latents {x.shape})")
  h, w = Hl // p, Wl // p
  x = x.reshape(B, T, h, p, w, p, C)  # [B, T, h, dy, w, dx, C]
  x = jnp.transpose(x, (0, 1, 2, 4, 6, 3, 5))  # [B, T, h, w, C, dy, dx]
  return x.reshape(B, T * h * w, C * p * p)


def unpatchify(x: Float[Array, "B L Cpp"], T: int, h: int, w: int, p: int) -> Float[Array, "B T Hl Wl C"]:
  """Inverse of `patchify`: token (t, y, x) with outputs (c, dy, dx) -> pixel (t, p*y+dy, p*x+dx, c) (§2.7)."""
  B = x.shape[0]
  C = x.shape[-1] // (p * p)
  x = x.reshape(B, T, h, w, C, p, p)  # [B, T, h, w, C, dy, dx]
  x = jnp.transpose(x, (0, 1, 2, 5, 3, 6, 4))  # [B, T, h, dy, w, dx, C]
  return x.reshape(B, T, h * p, w * p, C)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
  """x * (1 + scale) + shift with [B, D] modulation broadcast over tokens."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


def window_frames(num_scenes: int, num_frames: int, attn_length: int, prefix: int) -> np.ndarray:
  """Frame indices [n, prefix + attn_length] of the local-attention windows [a*i, a*i + prefix + a) (§2.5)."""
  if num_frames != attn_length * num_scenes + prefix:
    raise ValueError(
        f"{num_frames} latent frames do not fit {num_scenes} scene(s): local attention needs "
        f"T = attn_length * n + prefix_temporal_length = {attn_length}*{num_scenes}+{prefix} = "
        f"{attn_length * num_scenes + prefix}")
  return attn_length * np.arange(num_scenes)[:, None] + np.arange(prefix + attn_length)[None, :]


def window_coverage(num_scenes: int, num_frames: int, attn_length: int, prefix: int) -> np.ndarray:
  """How many windows cover each frame, [T] (1, or 2 on the shared frames 12, 24, ...)."""
  counts = np.zeros(num_frames, np.int64)
  np.add.at(counts, window_frames(num_scenes, num_frames, attn_length, prefix).reshape(-1), 1)
  return counts


def attention_reference(q: Array, k: Array, v: Array) -> Array:
  """softmax(q k^T / sqrt(d)) v with q, k, v [B, L, H, d]; softmax in float32 (or float64)."""
  acc = jnp.promote_types(q.dtype, jnp.float32)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=acc) / math.sqrt(q.shape[-1])
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=acc).astype(q.dtype)


def attention_chunked(q: Array, k: Array, v: Array, q_chunk: int = 1024) -> Array:
  """Exact attention computed one (batch row, query chunk) at a time: logits [H, q_chunk, L_k] live at once.

  The XLA fallback for long windows (a 5B window is ~18k tokens x 48 heads: full logits would be
  ~60 GB per window). Queries are zero-padded to a multiple of `q_chunk`; padded rows are dropped.
  """
  B, Lq, H, d = q.shape
  c = min(q_chunk, Lq)
  pad = -Lq % c
  qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, (Lq + pad) // c, c, H, d)

  def one_row(args):  # q [NQ, c, H, d], k/v [Lk, H, d]
    qr, kr, vr = args
    return jax.lax.map(lambda qc: attention_reference(qc[None], kr[None], vr[None])[0], qr)  # [NQ, c, H, d]

  out = jax.lax.map(one_row, (qp, k, v))  # [B, NQ, c, H, d]
  return out.reshape(B, Lq + pad, H, d)[:, :Lq]


def attention(q: Array, k: Array, v: Array, implementation: str = "auto") -> Array:
  """Full non-causal attention over [B, L, H, d].

  "reference": einsum softmax; "xla": jax.nn.dot_product_attention (full logits); "cudnn": fused flash
  attention (GPU, bf16/fp16); "chunked": `attention_chunked`; "auto": cudnn on GPU for 16-bit inputs,
  else xla for short sequences and chunked for long ones.
  """
  if q.dtype == jnp.float64 or implementation == "reference":
    return attention_reference(q, k, v)
  if implementation == "auto":
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
      implementation = "cudnn"
    else:
      implementation = "chunked" if q.shape[1] * k.shape[1] > 4096 * 4096 else "xla"
  if implementation == "chunked":
    return attention_chunked(q, k, v)
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


def sequence_parallel(x: Float[Array, "B L D"], axis: str) -> Float[Array, "B L D"]:
  """Constrains x to be split along L over mesh `axis` (official MLP sequence parallelism, §8.1).

  Identity without a current mesh (`jax.set_mesh`) holding `axis` with more than one device, or when
  that size does not divide L; the batch dim is left to sharding propagation.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if not axis or mesh.empty or axis not in mesh.axis_names:
    return x
  n = mesh.shape[axis]
  if n == 1 or x.shape[1] % n:
    return x
  spec = jax.sharding.PartitionSpec(jax.sharding.PartitionSpec.UNCONSTRAINED, axis, None)
  return jax.lax.with_sharding_constraint(x, spec)


def _maybe_remat(flag: bool, fn: Callable) -> Callable:
  """nnx.remat(fn) when `flag`, else fn (fn takes the module as its first argument)."""
  return nnx.remat(fn) if flag else fn


# ----------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------


def scan_over_layers(layers: list[nnx.Module], x_v: Array, x_t: Array, e: Array, meta: SequenceMetadata, *,
                     remat_group: int = 0) -> tuple[Array, Array]:
  """Identical layers applied in order as one `lax.scan` over their stacked states (same math as a loop).

  One group of layers is traced and compiled instead of len(layers). The stacked parameters are built
  inside the traced program (a copy of the layer weights). `remat_group` = g > 0: each scan step runs g
  consecutive layers under `jax.checkpoint` (the loop's remat groups); 0: one layer per step, no remat.
  """
  splits = [nnx.split(layer) for layer in layers]
  graphdef = splits[0][0]
  for i, (gd, _) in enumerate(splits):
    if gd != graphdef:
      raise ValueError(f"scan_layers: layer {i} has a different structure from layer 0")
  for path, module in nnx.iter_graph(layers[0]):
    if getattr(module, "collect_diagnostics", False):
      raise ValueError(f"scan_layers: layer module {path} collects diagnostics (nnx.sow), which cannot leave "
                       f"a lax.scan; set scan_layers=False to collect them")
  g = max(remat_group, 1)
  if len(layers) % g:
    raise ValueError(f"scan_layers: remat group {g} does not divide {len(layers)} layers")
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs).reshape((len(xs) // g, g) + xs[0].shape),
                         *[st for _, st in splits])  # [num_layers / g, g, ...] leaves

  def body(carry, group_state):
    a, b = carry
    for i in range(g):
      a, b = nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], group_state))(a, b, e, meta)
    return (a, b), None

  if remat_group:
    body = jax.checkpoint(body)
  (x_v, x_t), _ = jax.lax.scan(body, (x_v, x_t), stacked)
  return x_v, x_t


class TimeEmbedding(nnx.Module):
  """Linear(D -> E) -> SiLU -> Linear(E -> E) on the sinusoid (official `time_embed.0` / `.2`)."""

  def __init__(self, model_dim: int, time_embed_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.linear_1 = nnx.Linear(model_dim, time_embed_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear_2 = nnx.Linear(time_embed_dim, time_embed_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, emb: Array) -> Array:
    return self.linear_2(jax.nn.silu(self.linear_1(emb)))


class PatchEmbedding(nnx.Module):
  """Dense form of the 2x2 conv on video patches (`vid_proj`) and the text projection (`text_proj`)."""

  def __init__(self, in_channels: int, patch_size: int, model_dim: int, text_dim: int, *, dtype,
               param_dtype, rngs: nnx.Rngs):
    self.patch_size = patch_size
    self.vid_proj = nnx.Linear(in_channels * patch_size * patch_size, model_dim, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
    self.text_proj = nnx.Linear(text_dim, model_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, latents: Array, text: Array) -> tuple[Array, Array]:
    """latents [B, T, Hl, Wl, C], text [B, S, L_t, Dt] -> (video [B, T*h*w, D], text [B, S*L_t, D])."""
    vid = self.vid_proj(patchify(latents, self.patch_size))  # [B, L_v, D]
    B, S, Lt, _ = text.shape
    txt = self.text_proj(text).reshape(B, S * Lt, -1)  # [B, S*L_t, D]
    return vid, txt


class MLP(nnx.Module):
  """Linear(D -> 4D) -> GELU(tanh) -> Linear(4D -> D) (official `mlp.layer1/2`)."""

  def __init__(self, model_dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.layer1 = nnx.Linear(model_dim, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layer2 = nnx.Linear(hidden, model_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return self.layer2(jax.nn.gelu(self.layer1(x), approximate=True))


def _layer_norm(dim: int, eps: float, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """Affine LayerNorm with biased variance computed as E[(x-mu)^2] (no fast-variance shortcut)."""
  return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
                       rngs=rngs)


class SeqModelingBlock(nnx.Module):
  """Local attention over [text_i | frames a*i .. a*i+a] windows, then (optionally) bidirectional TTT."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    c = config
    dtype, param_dtype = as_dtype(c.dtype), as_dtype(c.param_dtype)
    D, H = c.model_dim, c.num_heads
    self.num_heads, self.head_dim = H, D // H
    self.attn_length, self.prefix = c.attn_length, c.prefix_temporal_length
    self.theta, self.dtype = c.theta, dtype
    self.attention_implementation = c.attention_implementation
    self.sequence_layer = c.sequence_layer
    self.remat_attention = c.remat_attention
    self.remat_forward_ssm, self.remat_reverse_ssm = c.remat_forward_ssm, c.remat_reverse_ssm
    lin = lambda: nnx.Linear(D, D, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q, self.k, self.v, self.o = lin(), lin(), lin(), lin()
    self.q_norm = _layer_norm(self.head_dim, c.qk_norm_eps, dtype, param_dtype, rngs)
    self.k_norm = _layer_norm(self.head_dim, c.qk_norm_eps, dtype, param_dtype, rngs)
    if c.sequence_layer != "none":
      from ttt_dit.ttt.layer import SSM, Gate
      self.ssm = SSM(D, H, kind=c.sequence_layer, mini_batch_size=c.mini_batch_size,
                     ttt_base_lr=c.ttt_base_lr, rope_theta=c.rope_theta, post_norm_eps=c.ttt_post_norm_eps,
                     ttt_ln_eps=c.ttt_ln_eps, eta_mode=c.eta_mode,
                     scan_checkpoint_group_size=c.scan_checkpoint_group_size,
                     implementation=c.ttt_implementation, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
      gate = lambda: Gate(D, init_value=c.gating_alpha_init, param_dtype=param_dtype)
      self.forward_ssm_gating_text, self.forward_ssm_gating_video = gate(), gate()
      self.backward_ssm_gating_text, self.backward_ssm_gating_video = gate(), gate()

  def local_attention(self, x_v: Array, x_t: Array, meta: SequenceMetadata) -> tuple[Array, Array]:
    """Windowed attention (§2.5): x_v [B, L_v, D], x_t [B, n*L_t, D] -> (A_v, A_t), overlaps averaged."""
    B, _, D = x_v.shape
    H, d = self.num_heads, self.head_dim
    n, Lt, T, P = meta.num_scenes, meta.text_len, meta.num_frames, meta.tokens_per_frame
    frames = window_frames(n, T, self.attn_length, self.prefix)  # [n, W]
    W = frames.shape[1]

    def heads(proj, norm, x):  # [B, N, D] -> [B, N, H, d]
      y = proj(x).reshape(*x.shape[:2], H, d)
      return norm(y) if norm is not None else y

    cos, sin = attention_rope_tables(W, meta.height, meta.width, d, self.theta, self.dtype)  # [W*P, d/2]

    def windows(y_v, y_t, rope):  # -> [B*n, L_t + W*P, H, d]
      yw = jnp.take(y_v.reshape(B, T, P, H, d), jnp.asarray(frames), axis=1)  # [B, n, W, P, H, d]
      yw = yw.reshape(B, n, W * P, H, d)
      if rope:
        yw = apply_rope_interleaved(yw, cos, sin)
      s = jnp.concatenate([y_t.reshape(B, n, Lt, H, d), yw], axis=2)  # [B, n, Lt + W*P, H, d]
      return s.reshape(B * n, Lt + W * P, H, d)

    q = windows(heads(self.q, self.q_norm, x_v), heads(self.q, self.q_norm, x_t), True)
    k = windows(heads(self.k, self.k_norm, x_v), heads(self.k, self.k_norm, x_t), True)
    v = windows(heads(self.v, None, x_v), heads(self.v, None, x_t), False)
    out = attention(q, k, v, self.attention_implementation).reshape(B, n, Lt + W * P, H * d)
    out_t = out[:, :, :Lt].reshape(B, n * Lt, D)  # each text segment lies in exactly one window
    out_w = out[:, :, Lt:].reshape(B, n * W, P, D)  # [B, n*W, P, D]
    acc = jnp.promote_types(out.dtype, jnp.float32)
    summed = jnp.zeros((B, T, P, D), acc).at[:, jnp.asarray(frames.reshape(-1))].add(out_w.astype(acc))
    counts = jnp.asarray(window_coverage(n, T, self.attn_length, self.prefix), acc)  # [T]
    out_v = (summed / counts[None, :, None, None]).astype(out.dtype).reshape(B, T * P, D)
    return self.o(out_v), self.o(out_t)

  def __call__(self, x_v: Array, x_t: Array, meta: SequenceMetadata) -> tuple[Array, Array]:
    """(h_v, h_t) -> (y_v, y_t): attention output, plus the gated bidirectional TTT residuals."""
    attn = _maybe_remat(self.remat_attention, lambda m, a, b: m.local_attention(a, b, meta))
    a_v, a_t = attn(self, x_v, x_t)
    if self.sequence_layer == "none":
      return a_v, a_t
    from ttt_dit.ttt.layer import bidirectional_ttt
    fwd = _maybe_remat(self.remat_forward_ssm, lambda ssm, x: ssm(x, meta))
    rev = _maybe_remat(self.remat_reverse_ssm, lambda ssm, x: ssm(x, meta))
    A = jnp.concatenate([a_t, a_v], axis=1)  # [B, L, D] original order
    gates = (self.forward_ssm_gating_text, self.forward_ssm_gating_video,
             self.backward_ssm_gating_text, self.backward_ssm_gating_video)
    Y = bidirectional_ttt(lambda x, _: fwd(self.ssm, x), A, meta, gates,
                          reverse_ttt_fn=lambda x, _: rev(self.ssm, x))
    Lt = meta.text_tokens
    return Y[:, Lt:], Y[:, :Lt]


class TransformerLayer(nnx.Module):
  """adaLN-modulated sequence block and MLP over [text; video] (§2.4)."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    c = config
    dtype, param_dtype = as_dtype(c.dtype), as_dtype(c.param_dtype)
    D = c.model_dim
    self.remat_mlp, self.remat_seq_block = c.remat_mlp, c.remat_seq_block
    self.sequence_parallel_axis = c.sequence_parallel_axis
    self.pre_seq_layernorm = _layer_norm(D, c.layer_norm_eps, dtype, param_dtype, rngs)
    self.pre_seq_adaLN_modulation = nnx.Linear(c.time_embed_dim, 6 * D, dtype=dtype, param_dtype=param_dtype,
                                               rngs=rngs)
    self.seq_modeling_block = SeqModelingBlock(c, rngs=rngs)
    self.pre_mlp_layernorm = _layer_norm(D, c.layer_norm_eps, dtype, param_dtype, rngs)
    self.pre_mlp_adaLN_modulation = nnx.Linear(c.time_embed_dim, 6 * D, dtype=dtype, param_dtype=param_dtype,
                                               rngs=rngs)
    self.mlp = MLP(D, c.mlp_ratio * D, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x_v: Array, x_t: Array, e: Array, meta: SequenceMetadata) -> tuple[Array, Array]:
    """x_v [B, L_v, D], x_t [B, n*L_t, D], e = SiLU(t_emb) [B, E]."""
    s1v, c1v, g1v, s1t, c1t, g1t = jnp.split(self.pre_seq_adaLN_modulation(e), 6, axis=-1)  # 6 x [B, D]
    h_v = modulate(self.pre_seq_layernorm(x_v), s1v, c1v)
    h_t = modulate(self.pre_seq_layernorm(x_t), s1t, c1t)
    seq = _maybe_remat(self.remat_seq_block, lambda m, a, b: m(a, b, meta))
    y_v, y_t = seq(self.seq_modeling_block, h_v, h_t)
    x_v = x_v + g1v[:, None] * y_v
    x_t = x_t + g1t[:, None] * y_t
    s2v, c2v, g2v, s2t, c2t, g2t = jnp.split(self.pre_mlp_adaLN_modulation(e), 6, axis=-1)
    m = jnp.concatenate([modulate(self.pre_mlp_layernorm(x_t), s2t, c2t),
                         modulate(self.pre_mlp_layernorm(x_v), s2v, c2v)], axis=1)  # [B, L, D]
    m = sequence_parallel(m, self.sequence_parallel_axis)
    o = _maybe_remat(self.remat_mlp, lambda mlp, a: mlp(a))(self.mlp, m)
    Lt = x_t.shape[1]
    return x_v + g2v[:, None] * o[:, Lt:], x_t + g2t[:, None] * o[:, :Lt]


class FinalLayer(nnx.Module):
  """SiLU -> Linear(E -> 2D) (shift, scale); LayerNorm; modulate; Linear(D -> p*p*C) (§2.7)."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    c = config
    dtype, param_dtype = as_dtype(c.dtype), as_dtype(c.param_dtype)
    D = c.model_dim
    self.adaLN_modulation = nnx.Linear(c.time_embed_dim, 2 * D, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm = _layer_norm(D, c.layer_norm_eps, dtype, param_dtype, rngs)
    self.linear = nnx.Linear(D, c.patch_size * c.patch_size * c.out_channels, dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x_v: Array, e: Array) -> Array:
    shift, scale = jnp.split(self.adaLN_modulation(e), 2, axis=-1)
    return self.linear(modulate(self.norm(x_v), shift, scale))


class DiT(nnx.Module):
  """TTT-Video DiT: `model(latents [B,T,H,W,C], text [B,S,L_t,Dt] or [B,L_t,Dt], timesteps [B]) -> [B,T,H,W,C]`."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    validate_config(config)
    c = config
    dtype, param_dtype = as_dtype(c.dtype), as_dtype(c.param_dtype)
    self.dtype = dtype
    self.model_dim, self.patch_size, self.text_dim = c.model_dim, c.patch_size, c.text_dim
    self.in_channels, self.attn_length, self.prefix = c.in_channels, c.attn_length, c.prefix_temporal_length
    self.remat_layer_group_size = c.remat_layer_group_size
    self.scan_layers = bool(c.scan_layers)
    self.time_embed = TimeEmbedding(c.model_dim, c.time_embed_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.patch_embedding = PatchEmbedding(c.in_channels, c.patch_size, c.model_dim, c.text_dim, dtype=dtype,
                                          param_dtype=param_dtype, rngs=rngs)
    self.layers = nnx.List([TransformerLayer(c, rngs=rngs) for _ in range(c.num_layers)])
    self.transformer_norm = _layer_norm(c.model_dim, c.layer_norm_eps, dtype, param_dtype, rngs)
    self.final_layer = FinalLayer(c, rngs=rngs)

  def sequence_metadata(self, latents_shape: tuple[int, ...], text_shape: tuple[int, ...]) -> SequenceMetadata:
    """Checks the input shapes and derives (n, L_t, T, h, w); refuses inconsistent inputs."""
    if len(latents_shape) != 5 or latents_shape[-1] != self.in_channels:
      raise ValueError(f"latents must be [B, T, H, W, {self.in_channels}], got {latents_shape}")
    if len(text_shape) != 4 or text_shape[-1] != self.text_dim:
      raise ValueError(f"text must be [B, S, L_t, {self.text_dim}] (or [B, L_t, {self.text_dim}]), got {text_shape}")
    if text_shape[0] != latents_shape[0]:
      raise ValueError(f"batch sizes differ: latents {latents_shape}, text {text_shape}")
    B, T, Hl, Wl, _ = latents_shape
    p = self.patch_size
    window_frames(text_shape[1], T, self.attn_length, self.prefix)  # validates T vs n
    return SequenceMetadata(num_scenes=text_shape[1], text_len=text_shape[2], num_frames=T,
                            height=Hl // p, width=Wl // p)

  @staticmethod
  def _run_layers(layers, x_v: Array, x_t: Array, e: Array, meta: SequenceMetadata) -> tuple[Array, Array]:
    for layer in layers:
      x_v, x_t = layer(x_v, x_t, e, meta)
    return x_v, x_t

  def __call__(self, latents: Array, text: Array, timesteps: Array) -> Array:
    if text.ndim == 3:
      text = text[:, None]  # one scene
    meta = self.sequence_metadata(latents.shape, text.shape)
    B, T, Hl, Wl, _ = latents.shape
    dt = self.dtype
    t_emb = self.time_embed(timestep_embedding(jnp.asarray(timesteps), self.model_dim).astype(dt))  # [B, E]
    e = jax.nn.silu(t_emb)
    x_v, x_t = self.patch_embedding(latents.astype(dt), text.astype(dt))
    layers = list(self.layers)
    g = self.remat_layer_group_size
    if self.scan_layers:
      x_v, x_t = scan_over_layers(layers, x_v, x_t, e, meta, remat_group=g)
    elif g:
      group = nnx.remat(lambda mods, a, b, ee: DiT._run_layers(mods, a, b, ee, meta))
      for i in range(0, len(layers), g):
        x_v, x_t = group(nnx.List(layers[i:i + g]), x_v, x_t, e)
    else:
      x_v, x_t = self._run_layers(layers, x_v, x_t, e, meta)
    out = self.final_layer(self.transformer_norm(x_v), e)  # [B, L_v, p*p*C]
    p = self.patch_size
    return unpatchify(out, T, Hl // p, Wl // p, p)
