"""The kernels' float32 -> bf16 (hi, lo) split (`mgpu_common.split_bf16`), done in integer
arithmetic because XLA's GPU compiler removes `astype(bf16).astype(f32)` round trips under jit."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from pallas_kernels import mgpu_common
from pallas_kernels.ttt_mlp import ttt_mlp as T


def test_round_to_bf16_matches_ml_dtypes_round_to_nearest_even():
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.normal(size=4096).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 4096),
                      # exact ties: bf16 values plus half a bf16 ulp (ties go to the even one)
                      (np.float32(1.0) + np.float32(2.0 ** -8) * np.arange(1, 64, 2)).astype(np.float32),
                      np.array([0.0, -0.0, np.inf, -np.inf, 3.3895314e38], np.float32)])
  want = x.astype(ml_dtypes.bfloat16).astype(np.float32)
  got = np.asarray(jax.jit(mgpu_common.round_to_bf16)(jnp.asarray(x)))
  np.testing.assert_array_equal(got, want)
  assert np.isnan(np.asarray(mgpu_common.round_to_bf16(jnp.float32(np.nan))))


def test_split_bf16_pairs_hold_16_bits_and_the_kernel_state_uses_them():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 64, 64), jnp.float32) * 0.02
  hi, lo = jax.jit(mgpu_common.split_bf16)(x)
  assert hi.dtype == lo.dtype == jnp.bfloat16
  pair = hi.astype(jnp.float32) + lo.astype(jnp.float32)
  err = float(jnp.max(jnp.abs(pair - x) / jnp.abs(x)))
  assert 0 < err < 2.0 ** -15, err  # ~16 significant bits; lo is not zero
  assert float(jnp.max(jnp.abs(lo.astype(jnp.float32)))) > 0
  # the kernel wrapper's state split: w1h + w1l is W1 to ~16 bits
  H, B = 2, 1
  W1 = jax.random.normal(jax.random.PRNGKey(1), (H, 64, 256)) * 0.02
  W2 = jax.random.normal(jax.random.PRNGKey(2), (H, 256, 64)) * 0.02
  w1h, w1l, _, w2h, w2l, _ = jax.jit(T._to_kernel_state, static_argnums=4)(  # noqa: SLF001
      W1, jnp.zeros((H, 1, 256)), W2, jnp.zeros((H, 1, 64)), B)
  back = (w1h.astype(jnp.float32) + w1l.astype(jnp.float32)).transpose(0, 2, 1, 3).reshape(H, 64, 256)
  assert float(jnp.max(jnp.abs(back - W1) / jnp.abs(W1))) < 2.0 ** -15
  lo2 = (w2l.astype(jnp.float32)).reshape(H, 256, 64)
  assert float(jnp.max(jnp.abs(lo2))) > 0  # W2's lo halves are there too
