"""Schedule tables vs the spec's test vectors (§11.2) and the v-loss vs the official x0-form loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_dit.diffusion import loss, schedule


def test_betas_and_alphas_cumprod():
  b = schedule.betas()
  np.testing.assert_allclose([b[0], b[999]], [0.00085, 0.012], rtol=1e-12)
  ab = schedule.alphas_cumprod()
  np.testing.assert_allclose([ab[0], ab[999], np.sqrt(ab[999])], [0.99915, 0.0046601, 0.0682649], rtol=2e-5)


def test_training_table_vectors():
  tr = schedule.training_table()
  assert tr.shape == (1000,) and tr.dtype == np.float32
  idx = [0, 1, 10, 100, 500, 900, 998]
  want = [0.9995749, 0.9991164, 0.9948838, 0.9416800, 0.4909367, 0.0544095, 0.00044361]
  np.testing.assert_allclose(tr[idx], want, rtol=2e-6)
  assert tr[999] == 0.0
  np.testing.assert_allclose(tr[499], 0.4922999, rtol=2e-6)


def test_sampling_table_vectors():
  ts, a = schedule.sampling_table()
  np.testing.assert_array_equal(ts, 19 + 20 * np.arange(50))
  got = dict(zip(ts.tolist(), a.tolist()))
  want = {19: 0.9910823, 99: 0.9429754, 499: 0.4926093, 899: 0.0551079, 979: 0.0092680}
  for t, v in want.items():
    np.testing.assert_allclose(got[t], v, rtol=2e-6, err_msg=f"t={t}")
  assert got[999] == 0.0


def test_snap_to_training_index():
  ts, a = schedule.sampling_table()
  idx = schedule.snap_to_training_index(a)
  want = np.where(ts <= 219, ts - 1, ts)
  np.testing.assert_array_equal(idx, want)


def test_bad_num_steps():
  with pytest.raises(ValueError, match="num_steps"):
    schedule.sampling_timesteps(0)


def test_v_loss_equals_x0_form_and_mse():
  key = jax.random.PRNGKey(0)
  k1, k2, k3, k4 = jax.random.split(key, 4)
  x0 = jax.random.normal(k1, (3, 2, 4, 6, 16))
  noise = jax.random.normal(k2, x0.shape)
  wmat = jax.random.normal(k3, (16, 16)) * 0.3
  t = jnp.array([0, 500, 999])
  text = jnp.zeros((3, 1, 4, 8))

  def apply_fn(x, txt, tt):  # a small random linear denoiser that also sees t and the text
    return x @ wmat + 1e-3 * tt[:, None, None, None, None] + txt.sum()

  lv = loss.v_prediction_loss(apply_fn, x0, text, t, noise)
  lx = loss.x0_prediction_loss(apply_fn, x0, text, t, noise)
  np.testing.assert_allclose(lv, lx, rtol=2e-4)
  # Plain NumPy float64 transcription of ||F - v||^2.
  a = schedule.training_table()[np.asarray(t)].astype(np.float64)[:, None, None, None, None]
  x0n, nn = np.asarray(x0, np.float64), np.asarray(noise, np.float64)
  xt = a * x0n + np.sqrt(1 - a * a) * nn
  f = xt @ np.asarray(wmat, np.float64) + 1e-3 * np.asarray(t, np.float64)[:, None, None, None, None]
  v = a * nn - np.sqrt(1 - a * a) * x0n
  np.testing.assert_allclose(lv, np.mean((f - v) ** 2), rtol=1e-5)


def test_add_noise_endpoints():
  x0 = jnp.ones((2, 1, 2, 2, 16))
  noise = 2 * jnp.ones_like(x0)
  xt = loss.add_noise(x0, noise, jnp.array([1.0, 0.0]))
  np.testing.assert_allclose(xt[0], 1.0)
  np.testing.assert_allclose(xt[1], 2.0)


def test_latent_scale_round_trip():
  from ttt_dit.diffusion import latent_scale
  z = jnp.arange(6.0).reshape(1, 1, 1, 1, 6)
  assert latent_scale.DEFAULT_LATENT_SCALE == 1.0
  np.testing.assert_allclose(latent_scale.to_model_latents(z, 0.7), 0.7 * z, rtol=1e-6)
  np.testing.assert_allclose(latent_scale.to_vae_latents(latent_scale.to_model_latents(z, 0.7), 0.7), z, rtol=1e-6)
  with pytest.raises(ValueError, match="latent scale"):
    latent_scale.to_vae_latents(z, 0.0)
