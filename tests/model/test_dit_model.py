"""Pieces of the Flax DiT against naive references: patch embedding, time embedding, RoPE, local windows."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_dit.model import configs
from ttt_dit.model.dit import SeqModelingBlock, patchify, timestep_embedding, unpatchify, window_coverage, window_frames
from ttt_dit.model.rope import apply_rope_interleaved, apply_rope_reference, attention_rope_tables
from ttt_dit.ttt.multiscene import SequenceMetadata


def test_patchify_is_the_conv():
  """Dense patch embedding over (c, dy, dx)-flattened patches == the official 2x2 stride-2 Conv2d."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 4, 6, 16)).astype(np.float32)  # [B, T, H, W, C]
  w = rng.standard_normal((8, 16, 2, 2)).astype(np.float32)  # torch conv weight [O, C, kh, kw]
  dense = patchify(jnp.asarray(x), 2) @ jnp.asarray(w.reshape(8, -1).T)  # [B, T*h*w, O]
  conv = jax.lax.conv_general_dilated(jnp.asarray(x.reshape(6, 4, 6, 16)), jnp.asarray(w.transpose(2, 3, 1, 0)),
                                      (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))  # [B*T, h, w, O]
  np.testing.assert_allclose(np.asarray(dense), np.asarray(conv).reshape(2, 3 * 2 * 3, 8), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(unpatchify(patchify(jnp.asarray(x), 2), 3, 2, 3, 2)), x)


def test_timestep_embedding_matches_diffusers():
  import torch
  from diffusers.models.embeddings import get_timestep_embedding
  t = np.array([0, 1, 17, 500, 999])
  ref = get_timestep_embedding(torch.from_numpy(t), 64, flip_sin_to_cos=True, downscale_freq_shift=0).numpy()
  ours = np.asarray(timestep_embedding(jnp.asarray(t), 64))
  # Both compute t * f in float32; XLA's and torch's float32 exp differ by 1 ulp on a few frequencies,
  # which at t ~ 1000 moves the angle by ~1e-4 rad. Against the exact float64 sinusoid both are that close.
  np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-4)
  f = np.exp(-math.log(10000.0) * np.arange(32) / 32)
  exact = np.concatenate([np.cos(t[:, None] * f), np.sin(t[:, None] * f)], axis=-1)
  np.testing.assert_allclose(ours, exact, rtol=0, atol=2e-4)
  np.testing.assert_allclose(ours[:2], exact[:2], rtol=0, atol=1e-6)


def test_attention_rope_matches_naive_rotation():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((3 * 2 * 3, 2, 32))  # [L, H, d]
  cos, sin = attention_rope_tables(3, 2, 3, 32, 10000.0, jnp.float32)
  out = np.asarray(apply_rope_interleaved(jnp.asarray(x, jnp.float32), cos, sin))
  for h in range(2):
    np.testing.assert_allclose(out[:, h], apply_rope_reference(x[:, h], 3, 2, 3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 3, 6, 21])
def test_windows_cover_every_frame(n):
  T = 12 * n + 1
  frames = window_frames(n, T, 12, 1)
  assert frames.shape == (n, 13) and frames.min() == 0 and frames.max() == T - 1
  cover = window_coverage(n, T, 12, 1)
  assert np.all(cover >= 1)
  shared = [12 * i for i in range(1, n)]
  np.testing.assert_array_equal(np.nonzero(cover == 2)[0], shared)
  with pytest.raises(ValueError, match="do not fit"):
    window_frames(n, T + 1, 12, 1)


def _local_attention_reference(block, h_v, h_t, meta, a, prefix, eps):
  """The official loop (ttt-video-dit `_attn_forward`) in float64 numpy."""
  P, Lt, H = meta.tokens_per_frame, meta.text_len, block.num_heads
  g = lambda m: (np.asarray(m.kernel[...]), np.asarray(m.bias[...]))
  (Wq, bq), (Wk, bk), (Wv, bv), (Wo, bo) = g(block.q), g(block.k), g(block.v), g(block.o)
  ln = lambda x, m: ((x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
                     * np.asarray(m.scale[...]) + np.asarray(m.bias[...]))
  B, Lv, D = h_v.shape
  d = D // H
  out_v, count = np.zeros_like(h_v), np.zeros((Lv, 1))
  out_t = np.zeros_like(h_t)
  for i in range(meta.num_scenes):
    s, e = i * a * P, (prefix + (i + 1) * a) * P
    cur = np.concatenate([h_t[:, i * Lt:(i + 1) * Lt], h_v[:, s:e]], axis=1)  # [B, len, D]
    q = ln((cur @ Wq + bq).reshape(B, -1, H, d), block.q_norm)
    k = ln((cur @ Wk + bk).reshape(B, -1, H, d), block.k_norm)
    v = (cur @ Wv + bv).reshape(B, -1, H, d)
    for b in range(B):
      for hh in range(H):
        q[b, Lt:, hh] = apply_rope_reference(q[b, Lt:, hh], prefix + a, meta.height, meta.width)
        k[b, Lt:, hh] = apply_rope_reference(k[b, Lt:, hh], prefix + a, meta.height, meta.width)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", p, v).reshape(B, -1, D) @ Wo + bo
    out_t[:, i * Lt:(i + 1) * Lt] = o[:, :Lt]
    out_v[:, s:e] += o[:, Lt:]
    count[s:e] += 1
  return out_v / count, out_t


def test_local_attention_matches_official_loop(x64):
  c = configs.get_config("tiny", "none", "9s")
  c.dtype, c.param_dtype = "float64", "float64"
  block = SeqModelingBlock(c, rngs=nnx.Rngs(0))
  for m in (block.q_norm, block.k_norm):  # non-trivial LayerNorm affine
    m.scale[...] = 1 + 0.3 * jax.random.normal(jax.random.key(5), m.scale.shape, jnp.float64)
    m.bias[...] = 0.3 * jax.random.normal(jax.random.key(6), m.bias.shape, jnp.float64)
  meta = SequenceMetadata(num_scenes=3, text_len=5, num_frames=7, height=2, width=3)
  rng = np.random.default_rng(0)
  h_v = rng.standard_normal((2, meta.video_tokens, c.model_dim))
  h_t = rng.standard_normal((2, meta.text_tokens, c.model_dim))
  a_v, a_t = block.local_attention(jnp.asarray(h_v), jnp.asarray(h_t), meta)
  r_v, r_t = _local_attention_reference(block, h_v, h_t, meta, c.attn_length, c.prefix_temporal_length,
                                        c.qk_norm_eps)
  np.testing.assert_allclose(np.asarray(a_v), r_v, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(np.asarray(a_t), r_t, rtol=1e-10, atol=1e-10)
  # Locality: changing frames outside window 0 (frames 3..6) leaves text_0 and frames 0..1 unchanged.
  h_v2 = h_v.copy()
  h_v2[:, 3 * meta.tokens_per_frame:] += 1.0
  b_v, b_t = block.local_attention(jnp.asarray(h_v2), jnp.asarray(h_t), meta)
  np.testing.assert_allclose(np.asarray(b_t[:, :5]), r_t[:, :5], rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(np.asarray(b_v[:, :2 * 6]), r_v[:, :2 * 6], rtol=1e-12, atol=1e-12)
  assert not np.allclose(np.asarray(b_t[:, 5:]), r_t[:, 5:])


@pytest.mark.parametrize("impl", ["xla", "chunked", "auto"])
def test_attention_implementations_agree(impl):
  from ttt_dit.model.dit import attention, attention_chunked, attention_reference
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(k1, (2, 37, 3, 16))
  k = jax.random.normal(k2, (2, 29, 3, 16))
  v = jax.random.normal(k3, (2, 29, 3, 16))
  ref = attention_reference(q, k, v)
  out = attention_chunked(q, k, v, q_chunk=8) if impl == "chunked" else attention(q, k, v, impl)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
  # The einsum reference itself against a float64 numpy softmax.
  qn, kn, vn = (np.asarray(a, np.float64) for a in (q, k, v))
  lg = np.einsum("bqhd,bkhd->bhqk", qn, kn) / 4.0
  p = np.exp(lg - lg.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(ref), np.einsum("bhqk,bkhd->bqhd", p, vn), rtol=1e-5, atol=1e-5)
