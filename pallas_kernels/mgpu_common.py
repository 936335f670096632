"""Small Mosaic GPU helpers shared by the TTT kernels (inside a kernel body only)."""

from __future__ import annotations

from jax.experimental.pallas import mosaic_gpu as plgpu


def copy_in(copies, bars) -> None:
  """TMA each (gmem src, smem dst) pair on barrier i, then wait for all of them (one round trip)."""
  for i, (src, dst) in enumerate(copies):
    plgpu.copy_gmem_to_smem(src, dst, bars.at[i])
  for i in range(len(copies)):
    plgpu.barrier_wait(bars.at[i])


def per_head_kernel(body, *, out_type, scratch, BH: int, approx_math: bool, interpret=None,
                    **kwargs):
  """`plgpu.kernel` over a grid of one program per (batch, head) row ("bh"); interpret=None: compiled."""
  if interpret is not None:
    kwargs["interpret"] = interpret
  return plgpu.kernel(
      body, out_type=out_type, scratch_types=scratch, grid=(BH,), grid_names=("bh",),
      compiler_params=plgpu.CompilerParams(approx_math=approx_math), **kwargs)
