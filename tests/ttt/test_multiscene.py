"""Interleave / reverse index algebra and the official eta quirk, against the spec's numbers."""

import jax.numpy as jnp
import numpy as np
import pytest

from ttt_dit.ttt import multiscene as ms
from ttt_dit.ttt.rope import apply_rope_interleaved, rope_3d_angles

# (n scenes, L_t, T) of the 5B stages, 30 x 45 patch grid (spec §1.3).
STAGES = {"9s": (3, 502, 37), "18s": (6, 471, 73), "30s": (10, 497, 121), "63s": (21, 458, 253)}


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_interleave_then_undo_is_identity(n):
  meta = ms.SequenceMetadata(num_scenes=n, text_len=3, num_frames=4 * n + 1, height=2, width=3)
  pi, inv = ms.interleave_index(meta), ms.deinterleave_index(meta)
  tokens = np.random.default_rng(n).normal(size=(meta.total, 2))
  np.testing.assert_array_equal(tokens[pi][inv], tokens)
  assert sorted(pi.tolist()) == list(range(meta.total))  # a permutation


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_reverse_twice_is_identity_and_reverses_streams(n):
  meta = ms.SequenceMetadata(num_scenes=n, text_len=3, num_frames=4 * n + 1, height=2, width=3)
  rev = ms.reverse_index(meta)
  np.testing.assert_array_equal(rev[rev], np.arange(meta.total))
  Lt = meta.text_tokens
  np.testing.assert_array_equal(rev[Lt:], np.arange(meta.total)[Lt:][::-1])
  np.testing.assert_array_equal(rev[:3], np.arange((n - 1) * 3, n * 3))  # last segment first


def test_interleaved_layout_segments():
  meta = ms.SequenceMetadata(num_scenes=3, text_len=2, num_frames=13 * 0 + 37, height=1, width=1)
  pi = ms.interleave_index(meta)
  assert meta.segment_frames() == (13, 12, 12)
  # Segment 0: text_0 (0, 1) then video frames 0..12 (original 6..18), then text_1 (2, 3), ...
  np.testing.assert_array_equal(pi[:2], [0, 1])
  np.testing.assert_array_equal(pi[2:15], 6 + np.arange(13))
  np.testing.assert_array_equal(pi[15:17], [2, 3])
  np.testing.assert_array_equal(pi[17:29], 6 + 13 + np.arange(12))


@pytest.mark.parametrize("stage,offsets,mismatch", [
    ("9s", (18052, 16702), 544), ("18s", (18021, 16671), 1324),
    ("30s", (18047, 16697), 2370), ("63s", (18008, 16658), 5227)])
def test_official_stage_offsets_and_eta_quirk_counts(stage, offsets, mismatch):
  n, Lt, T = STAGES[stage]
  meta = ms.SequenceMetadata(num_scenes=n, text_len=Lt, num_frames=T, height=30, width=45)
  P = meta.tokens_per_frame
  frames = meta.segment_frames()
  assert (frames[0] * P + Lt, frames[1] * P + Lt) == offsets  # spec §4.1
  official = ms.eta_gather_index(meta, 64, "official")
  per_token = ms.eta_gather_index(meta, 64, "per_token")
  assert official.shape == (meta.total // 64, 64)
  mismatched = int(np.sum(np.any(official != per_token, axis=1)))
  assert mismatched == mismatch  # spec §4.2: mismatched / total mini-batches


def test_eta_modes_coincide_for_one_scene_and_reject_bad_lengths():
  meta = ms.SequenceMetadata(num_scenes=1, text_len=498, num_frames=13, height=30, width=45)
  np.testing.assert_array_equal(ms.eta_gather_index(meta, 64, "official"),
                                ms.eta_gather_index(meta, 64, "per_token"))
  bad = ms.SequenceMetadata(num_scenes=1, text_len=493, num_frames=13, height=30, width=45)
  with pytest.raises(ValueError, match="18043 .* not a multiple of the TTT mini-batch size 64"):
    ms.eta_gather_index(bad, 64, "official")
  with pytest.raises(ValueError, match="eta_mode"):
    ms.eta_gather_index(meta, 64, "intended")


def test_rope_matches_complex_rotation_with_listed_frequencies():
  T, h, w, d = 3, 2, 4, 16
  ang = rope_3d_angles(T, h, w, d)
  # Token (t, y, x) = (2, 1, 3): pairs 0..1 temporal, 2..4 height, 5..7 width (16/24/24 split at d=16).
  tok = (2 * h + 1) * w + 3
  ft = 10000.0 ** (-np.arange(0, 4, 2) / 4)
  fh = 10000.0 ** (-np.arange(0, 6, 2) / 6)
  np.testing.assert_allclose(ang[tok], np.concatenate([2 * ft, 1 * fh, 3 * fh]), rtol=1e-12)
  x = np.random.default_rng(0).normal(size=(1, T * h * w, 2, d))
  out = np.asarray(apply_rope_interleaved(jnp.asarray(x, jnp.float32), jnp.cos(ang).astype(jnp.float32),
                                          jnp.sin(ang).astype(jnp.float32)))
  z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * ang)[None, :, None, :]
  want = np.stack([z.real, z.imag], axis=-1).reshape(x.shape)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_metadata_validation():
  with pytest.raises(ValueError, match="num_scenes must be a positive int"):
    ms.SequenceMetadata(num_scenes=0, text_len=3, num_frames=5, height=1, width=1)
  with pytest.raises(ValueError, match="cannot hold"):
    ms.SequenceMetadata(num_scenes=6, text_len=3, num_frames=5, height=1, width=1)
