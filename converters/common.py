"""Shared converter machinery: safetensors snapshots, declarative key maps, strict errors, atomic orbax output.

Every converter in this package is a table of `Rule`s (source-key regex -> target path template +
transform name) applied to a `SafetensorsSnapshot` one tensor at a time. Shapes are checked for every
tensor *before* any data is read, and all problems (unknown, missing, mis-shaped, unreadable tensors)
are reported together in one `ValueError`. Output goes to a temporary sibling directory that is renamed
into place only when complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
from absl import logging
from safetensors import safe_open
from tqdm import tqdm

Shape = tuple[int, ...]

DTYPES: dict[str, Any] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "float64": np.dtype(np.float64),
}


def parse_dtype(name: str | Any) -> np.dtype:
  """Maps a `--dtype` flag value (or a numpy/jax dtype) to a numpy dtype; refuses unknown names."""
  if isinstance(name, str):
    if name not in DTYPES:
      raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]
  return np.dtype(name)


# ----------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------


class ConversionErrors:
  """Collects every problem of a conversion so that one ValueError can list all of them."""

  def __init__(self, context: str):
    self.context = context
    self.unknown: list[str] = []
    self.missing: list[str] = []
    self.mis_shaped: list[str] = []
    self.other: list[str] = []

  def add_unknown(self, key: str, where: str = "") -> None:
    """Records a source tensor that no rule maps."""
    self.unknown.append(f"{key}{f' ({where})' if where else ''}")

  def add_missing(self, target: str, hint: str = "") -> None:
    """Records a target parameter that no source tensor fills."""
    self.missing.append(f"{target}{f' (expected source {hint})' if hint else ''}")

  def add_shape(self, key: str, target: str, expected: Shape, got: Shape) -> None:
    """Records a tensor whose (transformed) shape differs from the target parameter's shape."""
    self.mis_shaped.append(f"{key} -> {target}: expected {tuple(expected)}, got {tuple(got)}")

  def add(self, message: str) -> None:
    """Records any other problem (unreadable file, duplicate target, bad dtype...)."""
    self.other.append(message)

  def __bool__(self) -> bool:
    return bool(self.unknown or self.missing or self.mis_shaped or self.other)

  def message(self) -> str:
    """Formats every recorded problem, grouped by kind."""
    parts = [f"{self.context}: conversion failed"]
    for title, items in (("unknown tensors", self.unknown), ("missing tensors", self.missing),
                         ("mis-shaped tensors", self.mis_shaped), ("other problems", self.other)):
      if items:
        parts.append(f"{len(items)} {title}:")
        parts.extend(f"  - {item}" for item in items)
    return "\n".join(parts)

  def raise_if_any(self) -> None:
    """Raises one ValueError naming every problem, if there is any."""
    if self:
      raise ValueError(self.message())


# ----------------------------------------------------------------------------------------------------
# Safetensors snapshots (single file or sharded with an index json)
# ----------------------------------------------------------------------------------------------------


def check_stored(context: str, stored: Mapping[str, Shape], expected: Mapping[str, Shape]) -> None:
  """One ValueError naming every unknown, missing and mis-shaped entry of `stored` (path -> shape)."""
  errors = ConversionErrors(context)
  for p in sorted(set(stored) - set(expected)):
    errors.add_unknown(p)
  for p in sorted(set(expected) - set(stored)):
    errors.add_missing(p)
  for p in sorted(set(stored) & set(expected)):
    if tuple(stored[p]) != tuple(expected[p]):
      errors.add_shape(p, p, tuple(expected[p]), tuple(stored[p]))
  errors.raise_if_any()


def _safetensors_header(path: str) -> dict[str, Any]:
  """Reads and validates a safetensors header; checks that every tensor's bytes lie inside the file."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise ValueError(f"{path}: truncated safetensors file (no header)")
    n = int.from_bytes(raw, "little")
    if n <= 0 or 8 + n > size:
      raise ValueError(f"{path}: truncated or corrupt safetensors header ({n} header bytes, file {size} bytes)")
    try:
      header = json.loads(f.read(n))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: corrupt safetensors header: {e}") from e
  data_size = size - 8 - n
  bad = [k for k, v in header.items()
         if k != "__metadata__" and v["data_offsets"][1] > data_size]
  if bad:
    raise ValueError(f"{path}: truncated file: data of {len(bad)} tensor(s) beyond end of file "
                     f"({data_size} data bytes): {', '.join(sorted(bad))}")
  return header


class SafetensorsSnapshot:
  """A folder of safetensors weights (one file, or shards listed by a `*.safetensors.index.json`).

  Reads headers only at construction; `get(key)` reads one tensor as a numpy array.
  """

  def __init__(self, path: str, errors: ConversionErrors | None = None):
    self.path = path
    self._key_to_file: dict[str, str] = {}
    self._shapes: dict[str, Shape] = {}
    self._dtypes: dict[str, str] = {}
    own_errors = errors is None
    errors = ConversionErrors(path) if errors is None else errors
    bad_files: set[str] = set()
    for file in self._discover(path):
      try:
        header = _safetensors_header(file)
      except (OSError, ValueError) as e:
        errors.add(str(e))
        bad_files.add(file)
        continue
      for key, info in header.items():
        if key == "__metadata__":
          continue
        if key in self._key_to_file:
          errors.add(f"{key}: present in both {self._key_to_file[key]} and {file}")
        self._key_to_file[key] = file
        self._shapes[key] = tuple(info["shape"])
        self._dtypes[key] = info["dtype"]
    if self._index is not None:
      for key, fname in self._index.items():
        file = os.path.join(self._folder, fname)
        if self._key_to_file.get(key) != file and file not in bad_files:
          errors.add(f"{key}: listed in the index under {fname} but not stored there")
    if own_errors:
      errors.raise_if_any()

  def _discover(self, path: str) -> list[str]:
    """Lists the shard files from the index json (never guessed names), or the single file."""
    self._index = None
    if os.path.isfile(path):
      self._folder = os.path.dirname(path)
      return [path]
    if not os.path.isdir(path):
      raise ValueError(f"{path}: no such file or directory")
    self._folder = path
    indexes = sorted(f for f in os.listdir(path) if f.endswith(".safetensors.index.json"))
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if len(indexes) > 1:
      raise ValueError(f"{path}: several safetensors index files: {indexes}")
    if indexes:
      with open(os.path.join(path, indexes[0])) as f:
        try:
          self._index = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
          raise ValueError(f"{path}/{indexes[0]}: not a safetensors index ({e!r})") from e
      shards = sorted(set(self._index.values()))
      absent = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
      if absent:
        raise ValueError(f"{path}: shards listed in {indexes[0]} are missing: {absent}")
      return [os.path.join(path, s) for s in shards]
    if len(files) != 1:
      raise ValueError(f"{path}: expected one .safetensors file or an index json, found {files}")
    return [os.path.join(path, files[0])]

  def keys(self) -> list[str]:
    """All tensor names, sorted."""
    return sorted(self._key_to_file)

  def shape(self, key: str) -> Shape:
    """Shape of one tensor from the header (no data read)."""
    return self._shapes[key]

  def dtype(self, key: str) -> str:
    """Safetensors dtype string of one tensor (e.g. 'BF16')."""
    return self._dtypes[key]

  def get(self, key: str) -> np.ndarray:
    """Reads one tensor (bf16 as ml_dtypes.bfloat16)."""
    file = self._key_to_file[key]
    try:
      with safe_open(file, framework="numpy") as f:
        return f.get_tensor(key)
    except Exception as e:  # safetensors raises its own error types for corrupt data.
      raise ValueError(f"{file}: cannot read tensor {key}: {e}") from e


# ----------------------------------------------------------------------------------------------------
# Declarative mapping tables
# ----------------------------------------------------------------------------------------------------


def _transpose(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.T)


def _conv2d_to_dense(x: np.ndarray) -> np.ndarray:
  """[O, C, kh, kw] conv weight -> [C*kh*kw, O] dense kernel over (c, dy, dx)-flattened patches."""
  return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda x: x,
    "transpose": _transpose,               # torch Linear [out, in] -> flax kernel [in, out]
    "conv2d_to_dense": _conv2d_to_dense,
}

TRANSFORM_SHAPES: dict[str, Callable[[Shape], Shape]] = {
    "identity": lambda s: tuple(s),
    "transpose": lambda s: tuple(reversed(s)) if len(s) == 2 else (-1,),
    "conv2d_to_dense": lambda s: (int(np.prod(s[1:])), s[0]) if len(s) == 4 else (-1,),
}


def invert_transform(name: str, x: np.ndarray, source_shape: Shape) -> np.ndarray:
  """Inverse of `TRANSFORMS[name]` (for writers back to the PyTorch layout)."""
  if name == "identity":
    return x
  if name == "transpose":
    return np.ascontiguousarray(x.T)
  if name == "conv2d_to_dense":
    return np.ascontiguousarray(x.T.reshape(source_shape))
  raise ValueError(f"unknown transform {name!r}")


@dataclasses.dataclass(frozen=True)
class Rule:
  """Maps source keys fully matching `pattern` to `target.format(**named_groups)` via `transform`."""
  pattern: str
  target: str
  transform: str = "identity"

  def __post_init__(self):
    if self.transform not in TRANSFORMS:
      raise ValueError(f"rule {self.pattern!r}: unknown transform {self.transform!r}")

  def match(self, key: str) -> str | None:
    """Returns the target path for `key`, or None when the rule does not apply."""
    m = re.fullmatch(self.pattern, key)
    return None if m is None else self.target.format(**m.groupdict())

  def source_for(self, target: str) -> str | None:
    """Inverse of `match` for simple patterns (named groups, escaped dots): the source key of `target`."""
    target_re = re.escape(self.target)
    target_re = re.sub(r"\\\{(\w+)\\\}|\{(\w+)\}", lambda m: f"(?P<{m.group(1) or m.group(2)}>[^.]+)", target_re)
    m = re.fullmatch(target_re, target)
    if m is None:
      return None
    template = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", self.pattern).replace("\\.", ".")
    if re.search(r"[\\()\[\]*+?|^$]", template):
      return None
    source = template.format(**m.groupdict())
    return source if self.match(source) == target else None


def map_key(key: str, rules: Sequence[Rule]) -> tuple[str, str] | None:
  """(target path, transform) of the first rule matching `key`, or None."""
  for rule in rules:
    target = rule.match(key)
    if target is not None:
      return target, rule.transform
  return None


@dataclasses.dataclass(frozen=True)
class Plan:
  """A checked conversion: source key -> (target path, transform)."""
  items: dict[str, tuple[str, str]]


def plan_conversion(snapshot: SafetensorsSnapshot, rules: Sequence[Rule], expected: Mapping[str, Shape], *,
                    ignore: Iterable[str] = (), errors: ConversionErrors | None = None) -> Plan:
  """Maps every source key and checks every shape from headers alone; raises listing all problems.

  Args:
    snapshot: the source tensors.
    rules: the mapping table.
    expected: target path -> shape of every parameter the converter must fill.
    ignore: regexes of source keys that are known and deliberately dropped.
    errors: an existing collector to add to (raised by the caller); a new one is raised here.
  """
  own = errors is None
  errors = ConversionErrors(snapshot.path) if errors is None else errors
  ignore = [re.compile(p) for p in ignore]
  items: dict[str, tuple[str, str]] = {}
  filled: dict[str, str] = {}
  for key in snapshot.keys():
    if any(p.fullmatch(key) for p in ignore):
      continue
    mapped = map_key(key, rules)
    if mapped is None or mapped[0] not in expected:
      errors.add_unknown(key, "" if mapped is None else f"maps to {mapped[0]}, which the model lacks")
      continue
    target, transform = mapped
    if target in filled:
      errors.add(f"{key} and {filled[target]} both map to {target}")
      continue
    got = TRANSFORM_SHAPES[transform](snapshot.shape(key))
    if tuple(got) != tuple(expected[target]):
      errors.add_shape(key, target, expected[target], snapshot.shape(key) if got == (-1,) else got)
    filled[target] = key
    items[key] = (target, transform)
  for target in sorted(set(expected) - set(filled)):
    sources = [src for src in (r.source_for(target) for r in rules) if src]
    errors.add_missing(target, sources[0] if sources else "")
  if own:
    errors.raise_if_any()
  return Plan(items)


def iterate_converted(snapshot: SafetensorsSnapshot, plan: Plan, dtype: Any,
                      desc: str = "converting") -> Iterator[tuple[str, np.ndarray]]:
  """Yields (target path, transformed array cast to `dtype`) one source tensor at a time, with a progress bar."""
  dtype = parse_dtype(dtype)
  for key in tqdm(list(plan.items), desc=desc, unit="tensor"):
    target, transform = plan.items[key]
    x = TRANSFORMS[transform](snapshot.get(key))
    yield target, x.astype(dtype, copy=False)


def convert_snapshot(snapshot: SafetensorsSnapshot, rules: Sequence[Rule], expected: Mapping[str, Shape],
                     dtype: Any, *, ignore: Iterable[str] = ()) -> dict[str, np.ndarray]:
  """Plans (all checks first) then converts a snapshot into a flat {target path: array} dict."""
  plan = plan_conversion(snapshot, rules, expected, ignore=ignore)
  return dict(iterate_converted(snapshot, plan, dtype))


# ----------------------------------------------------------------------------------------------------
# Trees, orbax and atomic output
# ----------------------------------------------------------------------------------------------------


def unflatten(flat: Mapping[str, Any], sep: str = ".") -> dict[str, Any]:
  """{'a.b.c': x} -> {'a': {'b': {'c': x}}} (all keys strings)."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split(sep)
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def flatten(tree: Mapping[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
  """Inverse of `unflatten` (keys stringified)."""
  flat: dict[str, Any] = {}
  for k, v in tree.items():
    path = f"{prefix}{sep}{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      flat.update(flatten(v, sep, path))
    else:
      flat[path] = v
  return flat


ORBAX_CONCURRENT_GB = 1  # bounds orbax's in-flight write/read buffers (default 96 GB would hold a 5B copy)


def _checkpointer():
  """A synchronous orbax Checkpointer over the standard handler with bounded concurrent bytes."""
  import orbax.checkpoint as ocp  # Imported lazily: orbax is slow to import.
  return ocp.Checkpointer(ocp.StandardCheckpointHandler(save_concurrent_gb=ORBAX_CONCURRENT_GB,
                                                        restore_concurrent_gb=ORBAX_CONCURRENT_GB))


def save_orbax(path: str, tree: Mapping[str, Any]) -> None:
  """Writes a nested dict of numpy arrays as an orbax (standard pytree) checkpoint at `path`.

  Numpy leaves are written in place (orbax's default deep-copies every host array first, which would
  hold a second copy of a 5B model) with bounded concurrent bytes; the save is synchronous, so the
  arrays cannot change while they are written.
  """
  import orbax.checkpoint as ocp
  from orbax.checkpoint import type_handlers
  from orbax.checkpoint._src.serialization import type_handler_registry as registry_lib
  kwargs = {}
  if "deepcopy_host_arrays" in inspect.signature(type_handlers.NumpyHandler).parameters:  # orbax 0.12.8 (pinned)
    handlers = dict(registry_lib._DEFAULT_TYPE_HANDLERS)  # noqa: SLF001 (no public copy of the defaults)
    handlers[np.ndarray] = type_handlers.NumpyHandler(deepcopy_host_arrays=False)
    kwargs["type_handler_registry"] = registry_lib.create_type_handler_registry(*handlers.items())
  else:  # other orbax versions: their default numpy handler (may copy host arrays first)
    logging.info("save_orbax: orbax %s has no deepcopy_host_arrays; host arrays may be copied before writing",
                 getattr(ocp, "__version__", "?"))
  handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=ORBAX_CONCURRENT_GB, **kwargs)
  path = os.path.abspath(path)
  with ocp.Checkpointer(handler) as ckptr:
    ckptr.save(path, args=ocp.args.PyTreeSave(dict(tree)))


def load_orbax(path: str, target: Any | None = None) -> Any:
  """Restores an orbax checkpoint written by `save_orbax` (optionally into an abstract `target` tree)."""
  import orbax.checkpoint as ocp
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise ValueError(f"{path}: no orbax checkpoint there")
  with _checkpointer() as ckptr:
    return ckptr.restore(path, args=ocp.args.StandardRestore(target))


class SpillStore:
  """Keeps converted tensors as read-only memory maps of files under `folder` instead of in RAM.

  A 5B conversion then needs about one tensor of anonymous memory at a time: the page cache holds the
  rest and can drop it under memory pressure. Delete the folder after the checkpoint is written.
  """

  def __init__(self, folder: str):
    self.folder = folder
    os.makedirs(folder, exist_ok=True)
    self._n = 0

  def put(self, x: np.ndarray) -> np.ndarray:
    """Writes `x` to a new file and returns a read-only memmap of it."""
    path = os.path.join(self.folder, f"{self._n:06d}.bin")
    self._n += 1
    if x.size == 0:
      return np.array(x)
    m = np.memmap(path, dtype=x.dtype, mode="w+", shape=x.shape)
    m[...] = x
    m.flush()
    del m
    return np.memmap(path, dtype=x.dtype, mode="r", shape=x.shape)

  def close(self) -> None:
    """Removes the spill files."""
    shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def staged_tensors(dst: str, spill_to_disk: bool = True) -> Iterator[tuple[dict[str, np.ndarray], Any]]:
  """(flat, keep): gather converted tensors as `flat[path] = keep(x)`; with `spill_to_disk` each is kept as
  a memory map under `dst + ".spill"` (a 5B conversion holds ~one tensor in RAM). Spill removed on exit."""
  spill = SpillStore(dst + ".spill") if spill_to_disk else None
  flat: dict[str, np.ndarray] = {}
  try:
    yield flat, (spill.put if spill is not None else (lambda a: a))
  finally:
    flat.clear()  # drop the memory maps before their files
    if spill is not None:
      spill.close()


@contextlib.contextmanager
def atomic_directory(dst: str, *, overwrite: bool = False) -> Iterator[str]:
  """Yields a temporary sibling `DST.tmp-XXXX` directory that is renamed to `dst` on success.

  On any exception the temporary directory is removed and `dst` is left untouched.
  """
  dst = os.path.abspath(dst)
  if os.path.exists(dst) and not overwrite:
    raise ValueError(f"{dst}: already exists (pass overwrite to replace it)")
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".tmp-", dir=parent)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.exists(dst):
    old = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".old-", dir=parent)
    os.rename(dst, os.path.join(old, "x"))
    os.rename(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(tmp, dst)
  logging.info("wrote %s", dst)


def write_json(path: str, obj: Any) -> None:
  """Writes pretty JSON (used for config files next to checkpoints)."""
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
