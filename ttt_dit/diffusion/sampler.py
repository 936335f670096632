"""The official stochastic DPM-Solver++(2M) SDE sampler in VP form, and a deterministic DDIM option.

Spec §5.3. Step i = 0..N-1 uses t_i = timesteps descending and a_i = sampling-table value (a_0 = 0,
pure noise), a_N = 1. The guided x0-prediction D_i snaps a_i to the nearest *training*-table value
for c_skip / c_out (the official quirk); the last step returns D_{N-1}. All per-step coefficients are
computed on the host in float64 (with the i=0 and i=1 infinities handled by explicit cases) and the
loop runs as one `lax.scan` inside `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ttt_dit.diffusion import guidance, schedule

DenoiseFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (x, text, t [B]) -> F (v-pred)
SAMPLERS = ("dpmpp2m", "ddim")


@dataclasses.dataclass(frozen=True)
class StepTable:
  """Host-side per-step constants (step order), float64 unless noted."""
  timesteps: np.ndarray   # [N] int, t_i descending (999, 979, ..., 19)
  a: np.ndarray           # [N+1] a_0..a_{N-1} from the sampling table, a_N = 1
  a_hat: np.ndarray       # [N] a_i snapped to the training table (c_skip = a_hat, c_out = -sqrt(1 - a_hat^2))
  cfg: np.ndarray         # [N] guidance scale s_i
  m1: np.ndarray          # [N] DPM++ multiplier of x_i
  m2: np.ndarray          # [N] DPM++ multiplier of D' (negative)
  sigma: np.ndarray       # [N] noise multiplier
  c_cur: np.ndarray       # [N] D' = c_cur D_i - c_prev D_{i-1}
  c_prev: np.ndarray      # [N]


def log_snr(a: float) -> float:
  """lambda(a) = log(a / sqrt(1 - a^2)); -inf at a = 0."""
  return -np.inf if a == 0.0 else float(np.log(a / np.sqrt(1.0 - a * a)))


def dpmpp2m_coefficients(a: np.ndarray) -> tuple[np.ndarray, ...]:
  """(m1, m2, sigma, c_cur, c_prev) for steps 0..N-1 from a [N+1]; i=0 (h=inf) and i=1 (r=inf) explicit."""
  n = len(a) - 1
  m1, m2, sig, c_cur, c_prev = (np.zeros(n) for _ in range(5))
  for i in range(n - 1):  # the last step returns D and has no update
    a_i, a_n = float(a[i]), float(a[i + 1])
    if a_i == 0.0:  # h = +inf: exp(-h) = 0, expm1(-2h) = -1
      m1[i], m2[i], sig[i] = 0.0, -a_n, np.sqrt(1.0 - a_n * a_n)
    else:
      h = log_snr(a_n) - log_snr(a_i)
      m1[i] = np.sqrt((1.0 - a_n * a_n) / (1.0 - a_i * a_i)) * np.exp(-h)
      m2[i] = np.expm1(-2.0 * h) * a_n
      sig[i] = np.sqrt(1.0 - a_n * a_n) * np.sqrt(-np.expm1(-2.0 * h))
    if i == 0 or float(a[i - 1]) == 0.0:  # first step, or r = +inf at i = 1: D' = D_i
      c_cur[i], c_prev[i] = 1.0, 0.0
    else:
      h = log_snr(a_n) - log_snr(a_i)
      r = (log_snr(a_i) - log_snr(float(a[i - 1]))) / h
      c_cur[i], c_prev[i] = 1.0 + 1.0 / (2.0 * r), 1.0 / (2.0 * r)
  return m1, m2, sig, c_cur, c_prev


def step_table(num_steps: int = 50, cfg_scale: float = 6.0, cfg_exp: float = 5,
               cfg_schedule: str = "official") -> StepTable:
  """Builds every per-step constant of the official sampler on the host."""
  ts_asc, a_asc = schedule.sampling_table(num_steps)
  ts = ts_asc[::-1].copy()                                            # [N] descending
  a = np.concatenate([a_asc[::-1].astype(np.float64), [1.0]])         # [N+1]
  train = schedule.training_table()
  a_hat = train[schedule.snap_to_training_index(a_asc[::-1])].astype(np.float64)
  cfg = guidance.cfg_scales(ts, cfg_scale, cfg_exp, cfg_schedule)
  m1, m2, sig, c_cur, c_prev = dpmpp2m_coefficients(a)
  return StepTable(ts, a, a_hat, cfg, m1, m2, sig, c_cur, c_prev)


def guided_x0(denoise_fn: DenoiseFn, x: Float[Array, "B T H W C"], text: jax.Array, text_uncond: jax.Array,
              t: jax.Array, a_hat: jax.Array, s: jax.Array, batch_cfg: bool = True,
              cfg_sharding: Any = None) -> jax.Array:
  """D = D_u + s (D_c - D_u), D_* = -sqrt(1 - a_hat^2) F(x, text_*, t) + a_hat x (c_in = 1, c_noise = t).

  `cfg_sharding` (a sharding of the 2B batch axis, e.g. NamedSharding(mesh, P("data"))) spreads the
  unconditional and conditional branches over devices when `batch_cfg` is on.
  """
  b = x.shape[0]
  tt = jnp.full((b,), t, dtype=jnp.int32)
  if batch_cfg:  # one forward of batch 2B: [uncond; cond]
    xs, texts, ts = jnp.concatenate([x, x]), jnp.concatenate([text_uncond, text]), jnp.concatenate([tt, tt])
    if cfg_sharding is not None:
      xs, texts, ts = (jax.lax.with_sharding_constraint(v, cfg_sharding) for v in (xs, texts, ts))
    f = denoise_fn(xs, texts, ts)
    f_u, f_c = f[:b], f[b:]
  else:  # unconditional first, as official
    f_u = denoise_fn(x, text_uncond, tt)
    f_c = denoise_fn(x, text, tt)
  c_out = -jnp.sqrt(1.0 - a_hat * a_hat)
  d_u = c_out * f_u.astype(jnp.float32) + a_hat * x
  d_c = c_out * f_c.astype(jnp.float32) + a_hat * x
  return guidance.guide(d_u, d_c, s)


def dpmpp2m_update(x: jax.Array, d: jax.Array, d_prev: jax.Array, xi: jax.Array, m1, m2, sigma, c_cur,
                   c_prev) -> jax.Array:
  """x_{i+1} = m1 x_i - m2 (c_cur D_i - c_prev D_{i-1}) + sigma xi."""
  return m1 * x - m2 * (c_cur * d - c_prev * d_prev) + sigma * xi


def ddim_update(x: jax.Array, d: jax.Array, a_i, a_next) -> jax.Array:
  """Deterministic DDIM (eta = 0): x_{i+1} = a_{i+1} D + sqrt(1 - a_{i+1}^2) eps_hat, eps_hat from (x_i, D)."""
  eps = (x - a_i * d) / jnp.sqrt(1.0 - a_i * a_i)
  return a_next * d + jnp.sqrt(1.0 - a_next * a_next) * eps


def sample(denoise_fn: DenoiseFn, noise: Float[Array, "B T H W C"], text: jax.Array, text_uncond: jax.Array,
           key: jax.Array, table: StepTable, *, sampler: str = "dpmpp2m", batch_cfg: bool = True,
           progress: Callable[[int], None] | None = None, cfg_sharding: Any = None) -> Float[Array, "B T H W C"]:
  """Runs the whole denoising loop (a `lax.scan` over steps) and returns the final x0-prediction D_{N-1}.

  `noise` is x_0 (a_0 = 0, so it is used unscaled); `key` draws the fresh per-step SDE noise.
  `progress(i)` is called from the device after step i through a host callback (for tqdm).
  Call under `jax.jit` (see `make_sampler`) to compile the loop once.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
  n = len(table.timesteps)
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  per_step = dict(t=jnp.asarray(table.timesteps, jnp.int32), a=f32(table.a[:n]), a_next=f32(table.a[1:]),
                  a_hat=f32(table.a_hat), s=f32(table.cfg), m1=f32(table.m1), m2=f32(table.m2),
                  sigma=f32(table.sigma), c_cur=f32(table.c_cur), c_prev=f32(table.c_prev),
                  key=jax.random.split(key, n), i=jnp.arange(n))
  x0 = noise.astype(jnp.float32)

  def body(carry, c):
    x, d_prev = carry
    d = guided_x0(denoise_fn, x, text, text_uncond, c["t"], c["a_hat"], c["s"], batch_cfg, cfg_sharding)
    if sampler == "dpmpp2m":
      xi = jax.random.normal(c["key"], x.shape, jnp.float32)
      x_next = dpmpp2m_update(x, d, d_prev, xi, c["m1"], c["m2"], c["sigma"], c["c_cur"], c["c_prev"])
    else:
      x_next = ddim_update(x, d, c["a"], c["a_next"])
    if progress is not None:
      jax.debug.callback(progress, c["i"])
    return (x_next, d), None

  head = jax.tree.map(lambda v: v[:-1], per_step)
  last = jax.tree.map(lambda v: v[-1], per_step)
  (x, _), _ = jax.lax.scan(body, (x0, jnp.zeros_like(x0)), head)
  d = guided_x0(denoise_fn, x, text, text_uncond, last["t"], last["a_hat"], last["s"], batch_cfg, cfg_sharding)
  if progress is not None:
    jax.debug.callback(progress, last["i"])
  return d


def make_sampler(denoise_fn: Callable[..., jax.Array], table: StepTable, *, params: Any = None,
                 sampler: str = "dpmpp2m", batch_cfg: bool = True,
                 progress: Callable[[int], None] | None = None, cfg_sharding: Any = None) -> Callable[..., jax.Array]:
  """Jitted `run(noise, text, text_uncond, key) -> latents` for a fixed denoiser and step table.

  With `params`, the denoiser is `denoise_fn(params, x, text, t)` and the parameters are passed to the
  jitted loop as arguments (not baked into the program as constants: required for large models).
  `cfg_sharding` shards the batched CFG branches (see `guided_x0`); parameters stay as placed.
  """
  def run(p, noise, text, text_uncond, key):
    fn = denoise_fn if p is None else functools.partial(denoise_fn, p)
    return sample(fn, noise, text, text_uncond, key, table, sampler=sampler, batch_cfg=batch_cfg,
                  progress=progress, cfg_sharding=cfg_sharding)

  jitted = jax.jit(run)
  return lambda noise, text, text_uncond, key: jitted(params, noise, text, text_uncond, key)


def cfg_branch_sharding(num_devices: int | None = None) -> Any:
  """NamedSharding of the 2B CFG batch over a 2-device "data" mesh, or None with fewer than 2 devices."""
  n = jax.device_count() if num_devices is None else num_devices
  if n < 2:
    return None
  mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def sample_reference(denoise_fn: DenoiseFn, noise: np.ndarray, text, text_uncond, xis: list[np.ndarray],
                     table: StepTable, sampler: str = "dpmpp2m") -> np.ndarray:
  """Naive step-by-step Python loop (no scan, unbatched CFG), given the per-step Gaussians `xis`."""
  x = np.asarray(noise, np.float32)
  d_prev = np.zeros_like(x)
  n = len(table.timesteps)
  for i in range(n):
    d = np.asarray(guided_x0(denoise_fn, jnp.asarray(x), text, text_uncond, int(table.timesteps[i]),
                             np.float32(table.a_hat[i]), np.float32(table.cfg[i]), batch_cfg=False))
    if i == n - 1:
      return d
    if sampler == "dpmpp2m":
      x = (table.m1[i] * x - table.m2[i] * (table.c_cur[i] * d - table.c_prev[i] * d_prev)
           + table.sigma[i] * xis[i]).astype(np.float32)
    else:
      a_i, a_n = table.a[i], table.a[i + 1]
      eps = (x - a_i * d) / np.sqrt(1 - a_i * a_i)
      x = (a_n * d + np.sqrt(1 - a_n * a_n) * eps).astype(np.float32)
    d_prev = d
  return x
