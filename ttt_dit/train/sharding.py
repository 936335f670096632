"""Meshes and partition rules (spec §8.1): config-driven regex rules -> NamedShardings.

Mesh axes are ("data", "fsdp", "tensor"): `data` replicates parameters (HSDP's replicate axis),
`fsdp` shards large weights (and the batch, with `data`), `tensor` shards attention and TTT heads.
A rule is `(regex, spec)`: the first regex that `re.search`es a leaf's dotted path wins, and `spec`
is a PartitionSpec as a tuple (one entry per leading array dim: an axis name, a tuple of axis names,
or None). The same rules apply to optimizer state (whose paths end with the parameter's path), so
Adam moments are sharded like their parameters. An axis that does not divide its dimension is dropped
for that leaf (logged), so small presets run on any mesh.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ttt_dit.model import partition

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Official TP layout (spec §8.1) + FSDP over `fsdp` for every other matrix. First match wins.
DEFAULT_RULES = (
    # Attention: q/k/v column-parallel (each tensor rank owns H/tp heads); o consumes the head-sharded
    # activation (row-parallel, replicated output). q_norm/k_norm replicated (sequence-parallel).
    (r"seq_modeling_block\.(q|k|v)\.kernel$", ("fsdp", "tensor")),
    (r"seq_modeling_block\.(q|k|v)\.bias$", ("tensor",)),
    (r"seq_modeling_block\.o\.kernel$", ("tensor", "fsdp")),
    # TTT: wq/wk/wv/wo column-parallel; the inner-loop state and ttt_norm on the head axis; the
    # learnable eta weights and post_norm replicated.
    (r"ssm\.ttt\.w(q|k|v|o)\.kernel$", ("fsdp", "tensor")),
    (r"ssm\.ttt\.w(q|k|v|o)\.bias$", ("tensor",)),
    (r"ssm\.ttt\.(W1|b1|W2|b2|ttt_norm_weight|ttt_norm_bias)$", ("tensor",)),
    # Everything else that is a matrix: FSDP over the input dim (MLP weights replicated over tensor:
    # the MLP runs sequence-parallel in the original).
    (r"\.kernel$", ("fsdp", None)),
    # Vectors (biases, norms, gates) and scalars: replicated.
    (r".*", ()),
)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """(data, fsdp, tensor) mesh over all (or the given) devices; -1 in one axis = the remaining devices.

  A mesh smaller than the device count uses the first devices (single-process only, logged).
  """
  devices = list(devices) if devices is not None else jax.devices()
  n = len(devices)
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {tuple(shape)}: at most one axis may be -1")
  if -1 in shape:
    rest = int(np.prod([s for s in shape if s != -1]))
    if n % rest:
      raise ValueError(f"mesh shape {tuple(shape)}: {n} devices are not divisible by {rest}")
    shape[shape.index(-1)] = n // rest
  need = int(np.prod(shape))
  if need > n or (need < n and jax.process_count() > 1):
    raise ValueError(f"mesh shape {tuple(shape)} needs {need} devices, {n} are present "
                     f"(set config.mesh.shape, e.g. ({n}, 1, 1) or (-1, 1, 1))")
  if need < n:
    logging.warning("mesh %s uses %d of the %d devices", tuple(shape), need, n)
  return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices[:need])


def _axis_size(mesh: Mesh, entry: Any) -> int:
  """Number of devices along one PartitionSpec entry (None, an axis, or a tuple of axes)."""
  if entry is None:
    return 1
  names = entry if isinstance(entry, tuple) else (entry,)
  return int(np.prod([mesh.shape[a] for a in names]))


def spec_for(path: str, shape: Sequence[int], rules: Sequence[tuple[str, Sequence[Any]]], mesh: Mesh) -> P:
  """PartitionSpec of one leaf: first matching rule, axes that do not divide their dim dropped."""
  for pattern, spec in rules:
    if re.search(pattern, path):
      break
  else:
    raise ValueError(f"no partition rule matches {path!r}; add a catch-all ('.*', ()) rule")
  spec = tuple(tuple(e) if isinstance(e, list) else e for e in spec)[:len(shape)]
  for e in spec:
    for a in (e if isinstance(e, tuple) else (e,)):
      if a is not None and a not in mesh.shape:
        raise ValueError(f"rule {pattern!r} for {path!r} names mesh axis {a!r}; the mesh has {tuple(mesh.shape)}")
  out = []
  for dim, e in zip(shape, spec):
    if dim % _axis_size(mesh, e):
      logging.log_first_n(logging.INFO, "sharding: %s dim %d (%d) not divisible by %s; replicated on it", 20,
                          path, len(out), dim, e)
      e = None
    out.append(e)
  return P(*out)


def tree_specs(tree: Any, rules: Sequence[tuple[str, Sequence[Any]]], mesh: Mesh) -> Any:
  """Same-structure pytree of PartitionSpecs for parameters or optimizer state (arrays or abstract)."""
  def one(path, leaf):
    return spec_for(partition.path_str(path), getattr(leaf, "shape", ()), rules, mesh)
  return jax.tree_util.tree_map_with_path(one, tree)


def tree_shardings(tree: Any, rules: Sequence[tuple[str, Sequence[Any]]], mesh: Mesh) -> Any:
  """Same-structure pytree of NamedShardings."""
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), tree_specs(tree, rules, mesh),
                                is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch dim over (data, fsdp), the rest replicated (shared inside a tensor group)."""
  return NamedSharding(mesh, P(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
  """Number of data-parallel ranks W = |data| x |fsdp| (what the timestep strata are counted over)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def global_array(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A host-global numpy batch -> a global jax.Array; each process only copies its addressable shards."""
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


# Environment variables through which schedulers announce a multi-process launch.
_MULTI_PROCESS_ENV = (("JAX_COORDINATOR_ADDRESS", None), ("SLURM_STEP_NUM_TASKS", "int>1"),
                      ("OMPI_COMM_WORLD_SIZE", "int>1"), ("PMI_SIZE", "int>1"))


def launched_multi_process(env: Mapping[str, str] | None = None) -> bool:
  """True when a scheduler launched several processes (coordinator address set, or inside an srun step /
  mpirun / mpiexec of more than one task; a plain shell in a SLURM allocation is not a launch)."""
  env = os.environ if env is None else env
  for name, kind in _MULTI_PROCESS_ENV:
    value = env.get(name)
    if not value:
      continue
    if kind is None:
      return True
    try:
      if int(value) > 1:
        return True
    except ValueError:
      pass
  return False


def maybe_initialize_distributed(mode: str = "auto", env: Mapping[str, str] | None = None) -> bool:
  """`jax.distributed.initialize()` when mode == "on", or "auto" and a multi-process launch is detected."""
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"distributed mode must be 'auto', 'on' or 'off', got {mode!r}")
  if mode == "on" or (mode == "auto" and launched_multi_process(env)):
    jax.distributed.initialize()
    logging.info("jax.distributed: process %d of %d, %d global devices", jax.process_index(),
                 jax.process_count(), jax.device_count())
    return True
  return False
