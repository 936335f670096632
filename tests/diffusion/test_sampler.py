"""Sampler step algebra vs a plain NumPy transcription, CFG table vs spec §5.4, loop determinism, DDIM oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_dit.diffusion import guidance, sampler, schedule

SPEC_CFG = np.array("""
2.2915 2.5435 6.9744 6.4204 2.7881 4.2719 1.0376 4.1704 1.6180 6.9831
1.0048 2.8720 6.9768 1.6331 4.3297 2.4366 6.3773 6.0068 3.4479 3.1981
1.6548 6.6100 1.1947 4.2953 6.9854 1.5213 1.7616 1.0579 4.1275 1.4823
2.0026 5.9477 4.1432 6.5305 6.1398 6.9999 6.1684 1.1199 2.0975 6.6850
6.9992 2.3432 6.2128 1.2505 6.9996 6.8644 1.0636 1.0000 1.0000 1.1234
""".split(), dtype=np.float64)


def test_cfg_official_table_matches_spec():
  table = sampler.step_table()
  np.testing.assert_allclose(table.cfg, SPEC_CFG, atol=5e-5)
  np.testing.assert_array_equal(table.timesteps, 999 - 20 * np.arange(50))


def test_cfg_monotone_and_bad_name():
  s = guidance.cfg_scales(999 - 20 * np.arange(50), schedule="monotone")
  assert s[0] == 1.0 and np.all(np.diff(s) >= 0)
  np.testing.assert_allclose(s[-1], 6.86, atol=5e-3)
  with pytest.raises(ValueError, match="cfg_schedule"):
    guidance.cfg_scales([999], schedule="rising")


def _numpy_transcription(a):
  """The update coefficients written with IEEE infinities, exactly as the spec's pseudo-code."""
  out = []
  with np.errstate(divide="ignore", invalid="ignore"):
    lam = lambda v: np.log(v / np.sqrt(1.0 - v * v))
    for i in range(len(a) - 2):
      h = lam(a[i + 1]) - lam(a[i])
      m1 = np.sqrt((1 - a[i + 1] ** 2) / (1 - a[i] ** 2)) * np.exp(-h)
      m2 = np.expm1(-2 * h) * a[i + 1]
      sn = np.sqrt(1 - a[i + 1] ** 2) * np.sqrt(1 - np.exp(-2 * h))
      if i == 0:
        cc, cp = 1.0, 0.0
      else:
        r = (lam(a[i]) - lam(a[i - 1])) / h
        cc, cp = 1 + 1 / (2 * r), 1 / (2 * r)
      out.append((m1, m2, sn, cc, cp))
  return np.array(out)


def test_step_coefficients_vs_numpy_transcription():
  table = sampler.step_table()
  want = _numpy_transcription(table.a)                               # [49, 5]
  got = np.stack([table.m1, table.m2, table.sigma, table.c_cur, table.c_prev], -1)[:-1]
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
  # The explicit i = 0 / i = 1 cases.
  a1 = table.a[1]
  np.testing.assert_allclose(got[0, :3], [0.0, -a1, np.sqrt(1 - a1 * a1)], rtol=1e-15)
  np.testing.assert_array_equal(got[1, 3:], [1.0, 0.0])
  assert table.a[0] == 0.0 and table.a[-1] == 1.0
  np.testing.assert_allclose(table.a[-2], 0.9910823, rtol=2e-6)


def test_x0_snapping_quirk():
  table = sampler.step_table()
  train = schedule.training_table()
  want_idx = np.where(table.timesteps <= 219, table.timesteps - 1, table.timesteps)
  np.testing.assert_array_equal(table.a_hat, train[want_idx].astype(np.float64))


def _linear_denoiser(seed=0, c=16, d_text=8):
  """A tiny random linear stand-in for the DiT: F = x W + (text mean) U + t c."""
  rng = np.random.default_rng(seed)
  w = jnp.asarray(rng.normal(size=(c, c)) * 0.2, jnp.float32)
  u = jnp.asarray(rng.normal(size=(d_text, c)) * 0.2, jnp.float32)

  def f(x, text, t):
    tm = text.mean(axis=(1, 2)) @ u                                   # [B, C]
    return x @ w + tm[:, None, None, None, :] + 1e-4 * t[:, None, None, None, None].astype(jnp.float32)
  return f


def _inputs(seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  noise = jax.random.normal(k[0], (1, 2, 2, 3, 16))
  text = jax.random.normal(k[1], (1, 2, 4, 8))
  text_u = jax.random.normal(k[2], (1, 2, 4, 8))
  return noise, text, text_u


def test_scan_loop_equals_reference_loop():
  f = _linear_denoiser()
  table = sampler.step_table()
  noise, text, text_u = _inputs()
  key = jax.random.PRNGKey(7)
  got = sampler.make_sampler(f, table)(noise, text, text_u, key)
  xis = [np.asarray(jax.random.normal(k, noise.shape)) for k in jax.random.split(key, 50)]
  want = sampler.sample_reference(f, np.asarray(noise), text, text_u, xis, table)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
  unbatched = sampler.make_sampler(f, table, batch_cfg=False)(noise, text, text_u, key)
  np.testing.assert_allclose(unbatched, got, rtol=1e-5, atol=1e-6)


def test_fifty_steps_deterministic_and_seeded():
  f = _linear_denoiser()
  table = sampler.step_table()
  noise, text, text_u = _inputs()
  run = sampler.make_sampler(f, table)
  steps = []
  run_p = sampler.make_sampler(f, table, progress=lambda i: steps.append(int(i)))
  a = run_p(noise, text, text_u, jax.random.PRNGKey(1))
  jax.block_until_ready(a)
  b = run(noise, text, text_u, jax.random.PRNGKey(1))
  c = run(noise, text, text_u, jax.random.PRNGKey(2))
  np.testing.assert_array_equal(a, b)
  assert np.all(np.isfinite(a)) and not np.allclose(a, c)
  assert sorted(steps) == list(range(50))


def test_ddim_with_x0_oracle_recovers_x0():
  table = sampler.step_table()
  x0 = jax.random.normal(jax.random.PRNGKey(3), (1, 2, 2, 3, 16))
  a_hat_of_t = {int(t): float(a) for t, a in zip(table.timesteps, table.a_hat)}
  a_hat = jnp.asarray([a_hat_of_t.get(t, 0.0) for t in range(1000)], jnp.float32)

  def oracle(x, text, t):  # F such that -sqrt(1-a^2) F + a x = x0 exactly
    a = a_hat[t][:, None, None, None, None]
    return (a * x - jnp.broadcast_to(x0, x.shape)) / jnp.sqrt(1 - a * a)

  noise, text, text_u = _inputs()
  out = sampler.make_sampler(oracle, table, sampler="ddim")(noise, text, text_u, jax.random.PRNGKey(0))
  np.testing.assert_allclose(out, x0, atol=1e-4)
  # DDIM is deterministic: the key does not matter.
  out2 = sampler.make_sampler(oracle, table, sampler="ddim")(noise, text, text_u, jax.random.PRNGKey(9))
  np.testing.assert_array_equal(out, out2)


def test_ddim_step_keeps_eps():
  x0 = np.float32(0.3)
  eps = np.float32(-1.2)
  a_i, a_n = 0.4, 0.7
  x_i = a_i * x0 + np.sqrt(1 - a_i ** 2) * eps
  x_n = sampler.ddim_update(jnp.float32(x_i), jnp.float32(x0), a_i, a_n)
  np.testing.assert_allclose(x_n, a_n * x0 + np.sqrt(1 - a_n ** 2) * eps, rtol=1e-5)


def test_unknown_sampler():
  with pytest.raises(ValueError, match="sampler"):
    sampler.sample(_linear_denoiser(), *_inputs(), jax.random.PRNGKey(0), sampler.step_table(), sampler="euler")


def test_params_as_arguments_equal_closure():
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.normal(size=(16, 16)) * 0.2, jnp.float32)
  f_params = lambda p, x, text, t: x @ p["w"] + text.mean() + 0 * t[:, None, None, None, None]
  f_closed = lambda x, text, t: x @ w + text.mean() + 0 * t[:, None, None, None, None]
  table = sampler.step_table(10)
  noise, text, text_u = _inputs()
  key = jax.random.PRNGKey(4)
  a = sampler.make_sampler(f_params, table, params={"w": w})(noise, text, text_u, key)
  b = sampler.make_sampler(f_closed, table)(noise, text, text_u, key)
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from ttt_dit.diffusion import sampler
assert jax.device_count() == 2
rng = np.random.default_rng(0)
w = jnp.asarray(rng.normal(size=(16, 16)) * 0.2, jnp.float32)
f = lambda p, x, text, t: x @ p["w"] + text.mean(axis=(1, 2, 3))[:, None, None, None, None]
table = sampler.step_table(8)
k = jax.random.split(jax.random.PRNGKey(0), 3)
noise = jax.random.normal(k[0], (1, 2, 2, 3, 16))
text, text_u = jax.random.normal(k[1], (1, 2, 4, 8)), jax.random.normal(k[2], (1, 2, 4, 8))
sh = sampler.cfg_branch_sharding()
rep = jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec())
a = sampler.make_sampler(f, table, params=jax.device_put({"w": w}, rep), cfg_sharding=sh)(noise, text, text_u, k[0])
b = sampler.make_sampler(f, table, params={"w": w})(noise, text, text_u, k[0])
np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
print("SHARDED_OK")
"""


def test_cfg_branches_sharded_over_two_devices_match():
  import os, subprocess, sys
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  res = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, env=env, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  assert res.returncode == 0 and "SHARDED_OK" in res.stdout, res.stderr[-3000:]
