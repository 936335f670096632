"""Small Mosaic GPU helpers shared by the TTT kernels (inside a kernel body, or their launch)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

# [64, 64] SMEM tiles as wgmma operands (bf16) and f32 exchange / staging tiles: 128-byte swizzle.
BF16_TILE_TRANSFORMS = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
F32_TILE_TRANSFORMS = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))


def bf16_tiles(*lead: int) -> plgpu.SMEM:
  """SMEM of [*lead, 64, 64] bf16 wgmma operand tiles."""
  return plgpu.SMEM(lead + (64, 64), jnp.bfloat16, transforms=BF16_TILE_TRANSFORMS)


def f32_tile() -> plgpu.SMEM:
  """SMEM of one [64, 64] f32 tile (exchange slot, staging)."""
  return plgpu.SMEM((64, 64), jnp.float32, transforms=F32_TILE_TRANSFORMS)


def check_cluster(cluster: int) -> None:
  """The TTT-MLP kernels' cluster sizes: 1 (no exchange; interpret mode) or 2 (pairwise push)."""
  if cluster not in (1, 2):
    raise ValueError(f"cluster must be 1 or 2 (the exchange is a pairwise push), got {cluster}")


def pair_exchange(cluster: int, rank, slots):
  """(push, pull) of the 2-CTA cluster's [64, 64] f32 all-reduce (inside a kernel body).

  slots: per exchange slot (receive tile, its barrier), unused at cluster 1. push(x, slot) sends
  this CTA's partial into the peer's slot (DSMEM); pull(x, slot) waits for the peer's and returns
  x + peer (own + peer: bitwise equal on both CTAs). Identity / no-op at cluster 1.
  """
  def push(x, slot):
    if cluster > 1:
      recv, rbar = slots[slot]
      plgpu.async_store_smem(x, recv, rbar.at[0], cluster_idx=1 - rank, cluster_dim="c")

  def pull(x, slot):
    if cluster == 1:
      return x
    recv, rbar = slots[slot]
    plgpu.barrier_wait(rbar.at[0])
    return x + recv[...]
  return push, pull


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


def round_to_bf16(x: jax.Array) -> jax.Array:
  """float32 x rounded to the nearest bf16 value (ties to even), still float32.

  By integer arithmetic on the bits: XLA's GPU compiler removes `x.astype(bf16).astype(f32)`
  inside a jit (it may keep excess precision: openxla/xla#41605), which made every (hi, lo) split
  of the kernels' initial state on the GPU a lo of zero (NOTES-ttt-mlp.md "The lost lo halves").
  """
  bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  rounded = (bits + jnp.uint32(0x7FFF) + ((bits >> 16) & jnp.uint32(1))) & jnp.uint32(0xFFFF0000)
  return jnp.where(jnp.isnan(x), x, lax.bitcast_convert_type(rounded, jnp.float32))


def split_bf16(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """float32 x -> bf16 (hi, lo) with hi + lo = x to ~16 significant bits (what the kernels take
  as a float32 state); safe under jit on the GPU (`round_to_bf16`)."""
  x = x.astype(jnp.float32)
  hi = round_to_bf16(x)
  return hi.astype(jnp.bfloat16), (x - hi).astype(jnp.bfloat16)


_EXACT_MATH = [False]  # set by `exact_math()`


@contextlib.contextmanager
def exact_math():
  """Kernels built inside this context use exact tanh / rsqrt / division whatever their config
  says (a numerical diagnostic: `benchmarks/ttt_mlp_bisect.py --exact_math`). Build them under
  a fresh `jax.jit` inside it: a trace cached outside keeps its approximate math."""
  _EXACT_MATH[0] = True
  try:
    yield
  finally:
    _EXACT_MATH[0] = False


def compiler_params(approx_math: bool, profile: Profile | None = None,
                    reduction_scratch: int = DEFAULT_REDUCTION_SCRATCH) -> plgpu.CompilerParams:
  """The kernels' compiler parameters, with the profiler on when `profile` is given."""
  kw = dict(approx_math=approx_math and not _EXACT_MATH[0],
            reduction_scratch_bytes=reduction_scratch)
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


@dataclasses.dataclass(frozen=True)
class KernelParts:
  """A per-head kernel's pieces (what `per_head_kernel` would launch), for `two_role_kernel`.

  body(*inputs, *outputs, *scratch, bh=row) runs one row (None: the grid's "bh" index)."""

  body: Callable
  out_type: tuple
  scratch: list
  kwargs: dict  # plgpu.kernel keywords (cluster, cluster_names)
  approx_math: bool
  reduction_scratch: int


def _is_barrier(x) -> bool:
  return isinstance(x, (plgpu.Barrier, plgpu.ClusterBarrier))


def two_role_kernel(first: KernelParts, n_in_first: int, rows_first: int,
                    second: KernelParts, n_in_second: int, rows_second: int, programs_second: int,
                    interpret=None):
  """One launch running two per-head kernels side by side (e.g. a long sequential chain on part of
  the GPU and independent work on the SMs it leaves idle).

  Programs (clusters) 0 .. rows_first - 1 run `first`, one row each; programs rows_first ..
  rows_first + programs_second - 1 run `second` over its rows_second rows, program j taking rows
  j, j + programs_second, ... one after another. The two kernels' SMEM refs share one `RefUnion`
  (a CTA runs one role only); barriers stay each kernel's own. Returns
  f(*inputs_first, *inputs_second) -> (*outputs_first, *outputs_second).
  """
  if first.kwargs != second.kwargs or first.approx_math != second.approx_math:
    raise ValueError("two_role_kernel: the kernels' cluster and approx_math must agree, got "
                     f"{first.kwargs, first.approx_math} and {second.kwargs, second.approx_math}")
  mem = [[x for x in k.scratch if not _is_barrier(x)] for k in (first, second)]
  bars = [[x for x in k.scratch if _is_barrier(x)] for k in (first, second)]
  n_out = (len(first.out_type), len(second.out_type))
  P = programs_second
  trips = -(-rows_second // P)

  def merged(kernel, mem_refs, bar_refs):  # the kernel's scratch refs in its own order
    m, b = iter(mem_refs), iter(bar_refs)
    return [next(b) if _is_barrier(x) else next(m) for x in kernel.scratch]

  def body(*refs):
    ins = refs[:n_in_first], refs[n_in_first:n_in_first + n_in_second]
    o0 = n_in_first + n_in_second
    outs = refs[o0:o0 + n_out[0]], refs[o0 + n_out[0]:o0 + n_out[0] + n_out[1]]
    (mem0, mem1), *bar_refs = refs[o0 + n_out[0] + n_out[1]:]
    scr0 = merged(first, mem0, bar_refs[:len(bars[0])])
    scr1 = merged(second, mem1, bar_refs[len(bars[0]):])
    i = lax.axis_index("bh")

    @pl.when(i < rows_first)
    def _():
      first.body(*ins[0], *outs[0], *scr0, bh=i)

    @pl.when(i >= rows_first)
    def _():
      def one(t, carry):
        row = i - rows_first + t * P

        @pl.when(row < rows_second)
        def _():
          second.body(*ins[1], *outs[1], *scr1, bh=row)
        return carry
      lax.fori_loop(0, trips, one, 0)

  kw = dict(first.kwargs)
  if interpret is not None:
    kw["interpret"] = interpret
  return plgpu.kernel(
      body, out_type=tuple(first.out_type) + tuple(second.out_type),
      scratch_types=[plgpu.RefUnion(mem[0], mem[1])] + bars[0] + bars[1],
      grid=(rows_first + P,), grid_names=("bh",),
      compiler_params=compiler_params(first.approx_math, None,  # (one scratch: the larger)
                                      max(first.reduction_scratch, second.reduction_scratch)),
      **kw)


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
