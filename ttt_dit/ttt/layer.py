"""The TTT layer (spec §3.1-§3.2) and the bidirectional gated TTT pass (spec §4.4), Flax NNX.

`TTTLayer` owns the parameters that live under the official `seq_modeling_block.ssm.ttt` and calls
the pure inner loops of `ttt_dit.ttt.inner_loop`. Attribute names mirror the official PyTorch names
so that converters are plain tables.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_dit.ttt import inner_loop
from ttt_dit.ttt.multiscene import (SequenceMetadata, deinterleave_index, eta_gather_index,
                                    interleave_index, reverse_index)
from ttt_dit.ttt.rope import apply_rope_interleaved, rope_3d_angles

Array = jax.Array
TTTKind = Literal["ttt_mlp", "ttt_linear"]


def torch_linear_init(fan_in: int):
  """PyTorch's default nn.Linear init U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (spec §9.2)."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """x / max(||x||_2, eps) over the last axis (torch.nn.functional.normalize)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def reconstruction_target(v: Array, k: Array, gamma: Array, beta: Array) -> Array:
  """V_hat = gamma (D - mean) / (unbiased std + 1e-8) + beta + K with D = V - K (spec §3.2.4).

  v, k: [B, L, H, F]; gamma, beta: [H, F].
  """
  d = v - k
  mu = jnp.mean(d, axis=-1, keepdims=True)
  std = jnp.std(d, axis=-1, keepdims=True, ddof=1)
  return gamma * (d - mu) / (std + 1e-8) + beta + k


def video_rope_tables(meta: SequenceMetadata, head_dim: int, theta: float, dtype=jnp.float32):
  """cos/sin [L_v, F/2] with global frame positions (the TTT layer's RoPE, spec §3.3)."""
  ang = rope_3d_angles(meta.num_frames, meta.height, meta.width, head_dim, theta)
  return jnp.asarray(np.cos(ang), dtype), jnp.asarray(np.sin(ang), dtype)


def heads_to_minibatches(x: Array, mini_batch_size: int) -> Array:
  """[B, L, H, F] -> [B, H, NC, CS, F] (row-major split of the token axis)."""
  B, L, H, F = x.shape
  return jnp.transpose(x, (0, 2, 1, 3)).reshape(B, H, L // mini_batch_size, mini_batch_size, F)


def minibatches_to_tokens(x: Array) -> Array:
  """[B, H, NC, CS, F] -> [B, L, H*F] (heads concatenated head-major)."""
  B, H, NC, CS, F = x.shape
  return jnp.transpose(x.reshape(B, H, NC * CS, F), (0, 2, 1, 3)).reshape(B, NC * CS, H * F)


class TTTLayer(nnx.Module):
  """TTT-MLP or TTT-Linear over the whole (interleaved) sequence; official `ssm.ttt` parameters."""

  def __init__(self, model_dim: int, num_heads: int, *, kind: TTTKind = "ttt_mlp",
               mini_batch_size: int = 64, ttt_base_lr: float = 0.1, rope_theta: float = 10000.0,
               post_norm_eps: float = 1e-6, ttt_ln_eps: float = 1e-6,
               eta_mode: Literal["official", "per_token"] = "official",
               scan_checkpoint_group_size: int = 16,
               implementation: Literal["xla", "pallas"] = "xla",
               collect_diagnostics: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    if kind not in ("ttt_mlp", "ttt_linear"):
      raise ValueError(f"TTTLayer kind must be 'ttt_mlp' or 'ttt_linear', got {kind!r}")
    if model_dim % num_heads:
      raise ValueError(f"model_dim {model_dim} is not divisible by num_heads {num_heads}")
    if eta_mode not in ("official", "per_token"):
      raise ValueError(f"eta_mode must be 'official' or 'per_token', got {eta_mode!r}")
    D, H = model_dim, num_heads
    F = D // H
    self.kind, self.model_dim, self.num_heads, self.head_dim = kind, D, H, F
    self.mini_batch_size, self.ttt_base_lr, self.rope_theta = mini_batch_size, ttt_base_lr, rope_theta
    self.ttt_ln_eps, self.eta_mode = ttt_ln_eps, eta_mode
    self.scan_checkpoint_group_size, self.implementation = scan_checkpoint_group_size, implementation
    self.collect_diagnostics, self.dtype = collect_diagnostics, dtype

    def linear():
      init = torch_linear_init(D)
      return nnx.Linear(D, D, use_bias=True, kernel_init=init, bias_init=init, dtype=dtype,
                        param_dtype=param_dtype, rngs=rngs)

    self.wq, self.wk, self.wv, self.wo = linear(), linear(), linear(), linear()
    normal = nnx.initializers.normal(0.02)
    self.learnable_ttt_lr_weight = nnx.Param(normal(rngs.params(), (H, 1, D), param_dtype))
    self.learnable_ttt_lr_bias = nnx.Param(jnp.zeros((H, 1), param_dtype))
    self.ttt_norm_weight = nnx.Param(jnp.ones((H, F), param_dtype))
    self.ttt_norm_bias = nnx.Param(jnp.zeros((H, F), param_dtype))
    self.post_norm = nnx.LayerNorm(D, epsilon=post_norm_eps, dtype=dtype, param_dtype=param_dtype,
                                   rngs=rngs)
    hidden = 4 * F if kind == "ttt_mlp" else F
    self.W1 = nnx.Param(normal(rngs.params(), (H, F, hidden), param_dtype))
    self.b1 = nnx.Param(jnp.zeros((H, 1, hidden), param_dtype))
    if kind == "ttt_mlp":
      self.W2 = nnx.Param(normal(rngs.params(), (H, hidden, F), param_dtype))
      self.b2 = nnx.Param(jnp.zeros((H, 1, F), param_dtype))

  def learning_rate(self, x: Array) -> Array:
    """Per-token, per-head step size E / CS: [B, L, D] (original order) -> [B, H, L] (>= float32)."""
    f32 = jnp.promote_types(x.dtype, jnp.float32)
    w = self.learnable_ttt_lr_weight[...][:, 0, :].astype(f32)  # [H, D]
    b = self.learnable_ttt_lr_bias[...][:, 0].astype(f32)  # [H]
    logits = jnp.einsum("bld,hd->bhl", x.astype(f32), w) + b[None, :, None]
    return self.ttt_base_lr * jax.nn.sigmoid(logits) / self.head_dim / self.mini_batch_size

  def __call__(self, x: Array, meta: SequenceMetadata) -> Array:
    """x [B, L, D] in original order -> [B, L, D] in original order."""
    B, L, D = x.shape
    H, F, C = self.num_heads, self.head_dim, self.mini_batch_size
    if D != self.model_dim:
      raise ValueError(f"TTTLayer: input width {D} != model_dim {self.model_dim} (x {x.shape})")
    if L != meta.total:
      raise ValueError(f"TTTLayer: sequence length {L} does not match the metadata "
                       f"({meta.num_scenes} x {meta.text_len} text + {meta.num_frames} x "
                       f"{meta.tokens_per_frame} video = {meta.total})")
    if L % C:
      raise ValueError(f"TTTLayer: sequence length {L} is not a multiple of the mini-batch size {C} "
                       f"(x shape {x.shape}); choose text_len so that n*L_t + T*h*w % {C} == 0")
    f32 = jnp.promote_types(x.dtype, jnp.float32)  # steps 2-6 in (at least) float32
    split = lambda y: y.astype(f32).reshape(B, L, H, F)  # [B, L, H, F]
    q, k, v = split(self.wq(x)), split(self.wk(x)), split(self.wv(x))
    q, k = l2_normalize(q), l2_normalize(k)
    cos, sin = video_rope_tables(meta, F, self.rope_theta, f32)  # [L_v, F/2]
    Lt = meta.text_tokens
    q = q.at[:, Lt:].set(apply_rope_interleaved(q[:, Lt:], cos, sin))
    k = k.at[:, Lt:].set(apply_rope_interleaved(k[:, Lt:], cos, sin))
    gamma = self.ttt_norm_weight[...].astype(f32)  # [H, F]
    beta = self.ttt_norm_bias[...].astype(f32)
    v_hat = reconstruction_target(v, k, gamma, beta)  # [B, L, H, F]
    eta = self.learning_rate(x)  # [B, H, L]

    if meta.num_scenes > 1:
      pi = jnp.asarray(interleave_index(meta))
      q, k, v_hat = (jnp.take(a, pi, axis=1) for a in (q, k, v_hat))
    eta_idx = jnp.asarray(eta_gather_index(meta, C, self.eta_mode))  # [NC, CS]
    eta = jnp.take(eta, eta_idx, axis=2)  # [B, H, NC, CS]

    cd = self.dtype  # cast at the kernel boundary only
    XQ, XK, XV = (heads_to_minibatches(a, C).astype(cd) for a in (q, k, v_hat))  # [B,H,NC,CS,F]
    state = ((self.W1[...], self.b1[...], self.W2[...], self.b2[...]) if self.kind == "ttt_mlp"
             else (self.W1[...], self.b1[...]))
    kwargs = dict(checkpoint_group_size=self.scan_checkpoint_group_size, ln_eps=self.ttt_ln_eps,
                  diagnostics=self.collect_diagnostics)
    if self.kind == "ttt_mlp":
      res = inner_loop.ttt_mlp(XQ, XK, XV, eta, gamma, beta, *state,
                               implementation=self.implementation, **kwargs)
    else:
      res = inner_loop.ttt_linear(XQ, XK, XV, eta, gamma, beta, *state,
                                  implementation=self.implementation, **kwargs)
    if self.collect_diagnostics:
      res, diag = res
      self.sow(nnx.Intermediate, "ttt_diagnostics", diag)
    y = minibatches_to_tokens(res).astype(cd)  # [B, L, D]
    y = self.wo(self.post_norm(y))
    if meta.num_scenes > 1:
      y = jnp.take(y, jnp.asarray(deinterleave_index(meta)), axis=1)
    return y


class SSM(nnx.Module):
  """Holder mirroring the official `seq_modeling_block.ssm` (whose only child is `ttt`)."""

  def __init__(self, model_dim: int, num_heads: int, *, rngs: nnx.Rngs, **ttt_kwargs):
    self.ttt = TTTLayer(model_dim, num_heads, rngs=rngs, **ttt_kwargs)

  def __call__(self, x: Array, meta: SequenceMetadata) -> Array:
    return self.ttt(x, meta)


class Gate(nnx.Module):
  """tanh(alpha) * u with a per-channel alpha (official `*_ssm_gating_*.gating_alpha`, init 0.1)."""

  def __init__(self, model_dim: int, *, init_value: float = 0.1, param_dtype=jnp.float32):
    self.gating_alpha = nnx.Param(jnp.full((model_dim,), init_value, param_dtype))

  def __call__(self, u: Array) -> Array:
    alpha = self.gating_alpha[...].astype(jnp.promote_types(u.dtype, jnp.float32))
    return jnp.tanh(alpha).astype(u.dtype) * u


def reverse_sequence(x: Array, meta: SequenceMetadata) -> Array:
  """Rev: text segments in reverse order, video tokens flipped; an involution (spec §4.4)."""
  return jnp.take(x, jnp.asarray(reverse_index(meta)), axis=1)


def _gated(u: Array, text_gate: Callable, video_gate: Callable, text_tokens: int) -> Array:
  """[text_gate(u_text) ; video_gate(u_video)] along the token axis."""
  return jnp.concatenate([text_gate(u[:, :text_tokens]), video_gate(u[:, text_tokens:])], axis=1)


def bidirectional_ttt(ttt_fn: Callable[[Array, SequenceMetadata], Array], A: Array,
                      meta: SequenceMetadata, gates: tuple[Callable, Callable, Callable, Callable],
                      reverse_ttt_fn: Callable[[Array, SequenceMetadata], Array] | None = None
                      ) -> Array:
  """Forward then reversed TTT, each gated per stream (spec §4.4). A: [B, L, D] original order.

  gates = (forward_text, forward_video, backward_text, backward_video). `reverse_ttt_fn` defaults
  to `ttt_fn` (same parameters); pass a separately rematerialised wrapper of it if wanted.
  """
  ft, fv, bt, bv = gates
  Lt = meta.text_tokens
  Z = A + _gated(ttt_fn(A, meta), ft, fv, Lt)
  rev_fn = ttt_fn if reverse_ttt_fn is None else reverse_ttt_fn
  U2 = reverse_sequence(rev_fn(reverse_sequence(Z, meta), meta), meta)
  return Z + _gated(U2, bt, bv, Lt)
