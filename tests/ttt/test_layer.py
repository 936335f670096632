"""The TTT layer and the bidirectional gated pass vs a plain float64 NumPy/reference pipeline."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_dit.ttt import Gate, SequenceMetadata, TTTLayer, bidirectional_ttt
from ttt_dit.ttt import inner_loop as il
from ttt_dit.ttt import multiscene as ms


def layer_and_input(kind, n, eta_mode="official", dtype=jnp.float64, seed=0, C=8):
  # 2x3 patch grid, 4n+1 frames; text_len chosen so that L is a multiple of C.
  T, P = 4 * n + 1, 6
  Lt = next(l for l in range(1, 64) if (n * l + T * P) % C == 0)
  meta = SequenceMetadata(num_scenes=n, text_len=Lt, num_frames=T, height=2, width=3)
  layer = TTTLayer(32, 2, kind=kind, mini_batch_size=C, ttt_base_lr=1.0, eta_mode=eta_mode,
                   scan_checkpoint_group_size=2, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed))
  # Non-trivial LN / lr-gate parameters so every path is exercised.
  r = np.random.default_rng(seed + 100)
  layer.ttt_norm_weight[...] = jnp.asarray(1 + 0.1 * r.normal(size=(2, 16)), dtype)
  layer.ttt_norm_bias[...] = jnp.asarray(0.1 * r.normal(size=(2, 16)), dtype)
  layer.learnable_ttt_lr_bias[...] = jnp.asarray(r.normal(size=(2, 1)), dtype)
  x = jnp.asarray(r.normal(size=(2, meta.total, 32)), dtype)
  return layer, meta, x


def naive_layer(layer, meta, x):
  """Spec §3.2 step by step in float64 NumPy, with the grad-based inner-loop reference."""
  p = lambda v: np.asarray(v[...], np.float64)
  xn = np.asarray(x, np.float64)
  B, L, D = xn.shape
  H, F, C = layer.num_heads, layer.head_dim, layer.mini_batch_size
  lin = lambda m, a: a @ p(m.kernel) + p(m.bias)
  q, k, v = (lin(m, xn).reshape(B, L, H, F) for m in (layer.wq, layer.wk, layer.wv))
  q = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
  k = k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), 1e-12)
  # RoPE: interleaved pairs as complex numbers, global frame positions, video tokens only.
  Lt = meta.text_tokens
  t, yy, xx = np.meshgrid(np.arange(meta.num_frames), np.arange(meta.height),
                          np.arange(meta.width), indexing="ij")
  fr = lambda m: 10000.0 ** (-np.arange(0, m, 2) / m)
  ang = np.concatenate([t.reshape(-1, 1) * fr(F // 4), yy.reshape(-1, 1) * fr(3 * F // 8),
                        xx.reshape(-1, 1) * fr(3 * F // 8)], axis=1)  # [L_v, F/2]
  rot = lambda a: (lambda z: np.stack([z.real, z.imag], -1).reshape(a.shape))(
      (a[..., 0::2] + 1j * a[..., 1::2]) * np.exp(1j * ang)[None, :, None, :])
  q[:, Lt:], k[:, Lt:] = rot(q[:, Lt:]), rot(k[:, Lt:])
  gamma, beta = p(layer.ttt_norm_weight), p(layer.ttt_norm_bias)
  d = v - k
  v_hat = gamma * (d - d.mean(-1, keepdims=True)) / (d.std(-1, ddof=1, keepdims=True) + 1e-8) + beta + k
  w, b = p(layer.learnable_ttt_lr_weight)[:, 0], p(layer.learnable_ttt_lr_bias)[:, 0]
  E = layer.ttt_base_lr / (1 + np.exp(-(np.einsum("bld,hd->bhl", xn, w) + b[None, :, None]))) / F
  pi = ms.interleave_index(meta)
  NC = L // C
  eta = np.zeros((B, H, NC, C))
  for m in range(NC):
    if layer.eta_mode == "official":  # last row of the permuted eta matrix
      s = pi[m * C + C - 1] // C
      eta[:, :, m] = E[:, :, s * C:(s + 1) * C] / C
    else:
      eta[:, :, m] = E[:, :, pi[m * C:(m + 1) * C]] / C
  mb = lambda a: jnp.asarray(a[:, pi].transpose(0, 2, 1, 3).reshape(B, H, NC, C, F))
  state = [jnp.asarray(p(getattr(layer, s))) for s in (("W1", "b1", "W2", "b2")
                                                        if layer.kind == "ttt_mlp" else ("W1", "b1"))]
  ref = il.ttt_mlp_reference if layer.kind == "ttt_mlp" else il.ttt_linear_reference
  out = np.asarray(ref(mb(q), mb(k), mb(v_hat), jnp.asarray(eta), jnp.asarray(gamma),
                       jnp.asarray(beta), *state, ln_eps=layer.ttt_ln_eps))
  y = out.reshape(B, H, L, F).transpose(0, 2, 1, 3).reshape(B, L, D)
  mu, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
  y = (y - mu) / np.sqrt(var + 1e-6) * p(layer.post_norm.scale) + p(layer.post_norm.bias)
  y = lin(layer.wo, y)
  out = np.empty_like(y)
  out[:, pi] = y  # undo the interleave
  return out


@pytest.mark.parametrize("kind", ["ttt_mlp", "ttt_linear"])
@pytest.mark.parametrize("n,eta_mode", [(1, "official"), (3, "official"), (3, "per_token"),
                                        (5, "official")])
def test_layer_matches_naive_float64_pipeline(x64, kind, n, eta_mode):
  layer, meta, x = layer_and_input(kind, n, eta_mode)
  got = np.asarray(layer(x, meta))
  want = naive_layer(layer, meta, x)
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-10


def test_eta_modes_differ_for_several_scenes(x64):
  a, meta, x = layer_and_input("ttt_mlp", 3, "official")
  b, _, _ = layer_and_input("ttt_mlp", 3, "per_token")
  assert not np.allclose(np.asarray(a(x, meta)), np.asarray(b(x, meta)), rtol=1e-9, atol=0)


def test_bidirectional_pass_matches_its_definition(x64):
  layer, meta, A = layer_and_input("ttt_mlp", 3)
  gates = [Gate(32, init_value=v, param_dtype=jnp.float64) for v in (0.1, 0.2, -0.3, 0.4)]
  got = np.asarray(bidirectional_ttt(layer, A, meta, tuple(gates)))
  Lt = meta.text_tokens
  Lv = meta.video_tokens
  rev = lambda s: np.concatenate([s[:, Lt - (c + 1) * meta.text_len: Lt - c * meta.text_len]
                                  for c in range(meta.num_scenes)] + [s[:, Lt:][:, ::-1]], axis=1)
  g = [np.tanh(np.asarray(gt.gating_alpha[...])) for gt in gates]
  An = np.asarray(A)
  U1 = np.asarray(layer(A, meta))
  Z = An + np.concatenate([g[0] * U1[:, :Lt], g[1] * U1[:, Lt:]], axis=1)
  U2 = rev(np.asarray(layer(jnp.asarray(rev(Z)), meta)))
  want = Z + np.concatenate([g[2] * U2[:, :Lt], g[3] * U2[:, Lt:]], axis=1)
  assert Lv == An.shape[1] - Lt
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_zero_gates_give_identity_and_nonzero_gates_make_ttt_live():
  layer, meta, A = layer_and_input("ttt_mlp", 2, dtype=jnp.float32)
  zero = tuple(Gate(32, init_value=0.0) for _ in range(4))
  np.testing.assert_array_equal(bidirectional_ttt(layer, A, meta, zero), A)
  live = tuple(Gate(32) for _ in range(4))
  y0 = bidirectional_ttt(layer, A, meta, live)
  layer.W1[...] = layer.W1[...] * 2.0
  y1 = bidirectional_ttt(layer, A, meta, live)
  assert float(jnp.max(jnp.abs(y1 - y0))) > 1e-6


def test_bf16_compute_stays_close_to_float32():
  layer, meta, x = layer_and_input("ttt_mlp", 2, dtype=jnp.float32)
  y32 = layer(x, meta)
  layer.dtype = jnp.bfloat16
  for m in (layer.wq, layer.wk, layer.wv, layer.wo, layer.post_norm):
    m.dtype = jnp.bfloat16
  y16 = layer(x.astype(jnp.bfloat16), meta)
  assert y16.dtype == jnp.bfloat16
  err = float(jnp.linalg.norm((y16.astype(jnp.float32) - y32).ravel()) / jnp.linalg.norm(y32.ravel()))
  assert err < 3e-2


def test_layer_rejects_bad_lengths():
  layer, meta, x = layer_and_input("ttt_mlp", 1, dtype=jnp.float32)
  with pytest.raises(ValueError, match="does not match the metadata"):
    layer(x[:, :-1], meta)
  odd = SequenceMetadata(num_scenes=1, text_len=meta.text_len + 1, num_frames=meta.num_frames,
                         height=2, width=3)
  x2 = jnp.zeros((1, odd.total, 32))
  with pytest.raises(ValueError, match=rf"{odd.total} is not a multiple of the mini-batch size 8"):
    layer(x2, odd)
  with pytest.raises(ValueError, match="input width 16 != model_dim 32"):
    layer(x[..., :16], meta)
