"""Small Mosaic GPU helpers shared by the TTT kernels (inside a kernel body, or their launch)."""

from __future__ import annotations

import dataclasses

import jax

from jax.experimental.pallas import mosaic_gpu as plgpu


@dataclasses.dataclass(frozen=True)
class Profile:
  """Mosaic GPU's on-device profiler: every `jax.named_scope` region of the kernel body is timed
  (SM clock cycles, per warpgroup) and written as a Perfetto JSON trace into `dir` after each call.

  space: ranges recorded per warpgroup (16 bytes of SMEM each; later ones are dropped).
  """

  dir: str
  space: int = 256

  def __post_init__(self):
    if not self.dir or self.space < 1:
      raise ValueError(f"Profile needs a directory and space >= 1, got {self!r}")


# SMEM bytes for cross-warp reductions (a column sum of a [64, 64] f32 WGMMA-layout value is 8
# reductions of 1 KiB each: 2 KiB, Mosaic GPU's default, does them 2 at a time with 2 warpgroup
# barriers per round, 8 KiB all at once).
DEFAULT_REDUCTION_SCRATCH = 128 * 4 * 4


def compiler_params(approx_math: bool, profile: Profile | None = None,
                    reduction_scratch: int = DEFAULT_REDUCTION_SCRATCH) -> plgpu.CompilerParams:
  """The kernels' compiler parameters, with the profiler on when `profile` is given."""
  kw = dict(approx_math=approx_math, reduction_scratch_bytes=reduction_scratch)
  if profile is not None:
    kw.update(profile_space=profile.space, profile_dir=profile.dir, profile_bounds_check=True)
  return plgpu.CompilerParams(**kw)


def copy_in(copies, bars) -> None:
  """TMA each (gmem src, smem dst) pair on barrier i, then wait for all of them (one round trip)."""
  for i, (src, dst) in enumerate(copies):
    plgpu.copy_gmem_to_smem(src, dst, bars.at[i])
  for i in range(len(copies)):
    plgpu.barrier_wait(bars.at[i])


def per_head_kernel(body, *, out_type, scratch, BH: int, approx_math: bool, interpret=None,
                    profile: Profile | None = None,
                    reduction_scratch: int = DEFAULT_REDUCTION_SCRATCH, **kwargs):
  """`plgpu.kernel` over a grid of one program per (batch, head) row ("bh"); interpret=None: compiled.

  kwargs go to `plgpu.kernel` (e.g. cluster=(2,), cluster_names=("c",)).
  """
  if interpret is not None:
    kwargs["interpret"] = interpret
  return plgpu.kernel(
      body, out_type=out_type, scratch_types=scratch, grid=(BH,), grid_names=("bh",),
      compiler_params=compiler_params(approx_math, profile, reduction_scratch), **kwargs)


class Phases:
  """Consecutive `jax.named_scope` regions without nesting the code: `ph("A")` closes the open
  region (if any) and opens "A"; `ph.close()` ends the last. The regions are what `Profile` times;
  without a profile they only label the lowered code."""

  def __init__(self):
    self._open = None

  def __call__(self, name: str) -> None:
    self.close()
    self._open = jax.named_scope(name)
    self._open.__enter__()

  def close(self) -> None:
    if self._open is not None:
      self._open.__exit__(None, None, None)
      self._open = None
